package httpapi

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/pkg/cloud/auth"
	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/cloud/raftnode"
	"github.com/outpost-edge/outpost/pkg/cloud/service"
	"github.com/outpost-edge/outpost/pkg/wire"
)

const (
	edgeToken = "edge-token-e1"
	apiToken  = "api-token-0123"
	adminJWT  = "user-admin"
	viewerJWT = "user-viewer"
)

// users stands in for the service's access-token authenticator.
type users struct{}

func (users) Authenticate(_ context.Context, tok string) (auth.Principal, error) {
	switch tok {
	case adminJWT:
		return auth.Principal{Kind: auth.KindUser, Subject: "alice", Roles: []string{"admin"}}, nil
	case viewerJWT:
		return auth.Principal{Kind: auth.KindUser, Subject: "bob", Roles: []string{"viewer"}}, nil
	}
	return auth.Principal{}, auth.ErrUnauthenticated
}

func newServer(t *testing.T, f *fakeService, cfg Config) *Server {
	t.Helper()
	static, err := auth.NewStatic(map[string]string{"e1": edgeToken}, apiToken)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.NodeID == "" {
		cfg.NodeID = "n1"
	}
	cfg.HasAPIToken = true
	s, err := New(cfg, f, auth.Chain{static, users{}}, slog.New(slog.NewTextHandler(io.Discard, nil)), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Shutdown(context.Background()) })
	return s
}

type answer struct {
	status int
	header http.Header
	env    struct {
		Code    int             `json:"code"`
		Message string          `json:"message"`
		Data    json.RawMessage `json:"data"`
	}
	raw []byte
}

// call serves one request through the app; hdr is name, value pairs.
func call(t *testing.T, s *Server, method, path, token string, body []byte, hdr ...string) answer {
	t.Helper()
	req, err := http.NewRequest(method, path, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := s.App().Test(req, -1)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	a := answer{status: resp.StatusCode, header: resp.Header}
	if a.raw, err = io.ReadAll(resp.Body); err != nil {
		t.Fatal(err)
	}
	if strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		if err := json.Unmarshal(a.raw, &a.env); err != nil {
			t.Fatalf("%s %s: body %q is not an envelope: %v", method, path, a.raw, err)
		}
	}
	return a
}

// wantError checks an error answer: status, the envelope's code (= status),
// message and null data.
func (a answer) wantError(t *testing.T, status int, msg string) {
	t.Helper()
	if a.status != status || a.env.Code != status || string(a.env.Data) != "null" {
		t.Fatalf("answer %d %s, want %d with code %d and null data", a.status, a.raw, status, status)
	}
	if msg != "" && a.env.Message != msg {
		t.Fatalf("message %q, want %q", a.env.Message, msg)
	}
}

var pushBody = []byte(`{"edge":"e1","first_seq":3,"changes":[{"kind":"readings","device":"d1","readings":[{"ts":1,"metrics":{"v":1}}]}]}`)

// TestServiceErrors maps every sentinel the service returns to its status,
// message and headers, as clients (and edges) rely on them.
func TestServiceErrors(t *testing.T) {
	type route struct {
		method, path, token string
		body                []byte
	}
	push := route{"POST", "/sync/v1/push", edgeToken, pushBody}
	login := route{"POST", "/api/v1/auth/login", "", []byte(`{"code":"c"}`)}
	refresh := route{"POST", "/api/v1/auth/refresh", "", []byte(`{"refresh_token":"r"}`)}
	cases := []struct {
		name    string
		r       route
		err     error
		status  int
		msg     string
		headers map[string]string
	}{
		{"gap", push, &service.SeqGapError{Edge: "e1", First: 3, Expected: 7}, 409,
			`sequence gap: the cloud expects sequence 7 next from edge "e1", batch starts at 3`,
			map[string]string{wire.HeaderExpectedSeq: "7"}},
		{"another edge's batch", push, fmt.Errorf("%w: x", service.ErrWrongEdge), 403,
			`this token belongs to edge "e1"; it may not push as "e1"`, nil},
		{"invalid batch", push, fmt.Errorf("change 0 (seq 3): %w", (&wire.Change{Kind: "x", Device: "d"}).Validate()), 400,
			`change 0 (seq 3): unknown change kind "x" (want readings, reported, desired, meta or user)`, nil},
		{"overloaded", push, service.ErrOverloaded, 429, "", map[string]string{wire.HeaderRetryAfter: "1"}},
		{"overloaded, with the queue's estimate", push, &service.OverloadedError{RetryAfter: 3200 * time.Millisecond}, 429, "",
			map[string]string{wire.HeaderRetryAfter: "4"}},
		{"unknown outcome", push, service.ErrUnknownOutcome, 503, "",
			map[string]string{wire.HeaderRetryAfter: "1", hdrRetry: "1"}},
		{"internal detail stays in the log", push, errors.New("disk on fire"), 500, "internal error; see the server log", nil},
		{"state from another edge", route{"POST", "/sync/v1/state", edgeToken, []byte(`{"changes":[]}`)},
			service.ErrWrongEdge, 403, "", nil},
		{"heartbeat as another edge", route{"POST", "/sync/v1/heartbeat", edgeToken, []byte(`{"edge":"e1"}`)},
			service.ErrWrongEdge, 403, "", nil},
		{"pull cursor", route{"GET", "/sync/v1/pull?cursor=zz", edgeToken, nil}, service.ErrBadCursor, 400,
			"cursor is not one this API issued; start from an empty cursor", nil},
		{"device not found", route{"GET", "/api/v1/devices/d1", apiToken, nil}, service.ErrNotFound, 404, `device "d1" not found`, nil},
		{"readings cursor", route{"GET", "/api/v1/devices/d1/readings?cursor=x", apiToken, nil}, service.ErrBadCursor, 400,
			"cursor does not belong to this device's readings; start without one", nil},
		{"export cursor", route{"GET", "/api/v1/export?since=q", apiToken, nil}, service.ErrBadCursor, 400,
			`since "q" is not an export cursor (INDEX or INDEX.N from a previous export)`, nil},
		{"export cursor compacted", route{"GET", "/api/v1/export?since=3.1", apiToken, nil},
			&fsm.CompactedError{Cursor: "3.1", Earliest: "17"}, 410,
			`since "3.1": the changes after it were compacted away by retention (log_retention); the earliest available cursor is "17"`,
			map[string]string{hdrEarliestCursor: "17"}},
		{"user not found", route{"GET", "/api/v1/users/o1", apiToken, nil}, service.ErrNotFound, 404, `user "o1" not found`, nil},
		{"join conflict keeps raftnode's text", route{"POST", "/cluster/v1/join", apiToken,
			[]byte(`{"id":"n2","raft_addr":"h:1","http_addr":"h:2"}`)},
			fmt.Errorf("%w: raft address h:1 already belongs to node \"n1\"", service.ErrConflict), 409,
			`membership conflict: raft address h:1 already belongs to node "n1"`, nil},
		{"remove non-member", route{"DELETE", "/cluster/v1/nodes/n9", apiToken, nil}, service.ErrNoSuchNode, 404,
			`node "n9" is not a cluster member`, nil},
		{"dev login off", login, service.ErrDevLoginDisabled, 400, "", nil},
		{"dev login openid", login, service.ErrBadOpenID, 400, "dev login " + badOpenID, nil},
		{"no wechat", login, service.ErrLoginUnavailable, 503, "", map[string]string{wire.HeaderRetryAfter: "30"}},
		{"bad code", login, service.ErrInvalidCode, 400, "invalid or expired login code: call wx.login() again", nil},
		{"wechat rate limit", login, service.ErrLoginRateLimited, 429, "", map[string]string{wire.HeaderRetryAfter: "5"}},
		{"blocked", login, service.ErrUserBlocked, 403, "", nil},
		{"wechat down", login, service.ErrWeChatUnavailable, 503, "", map[string]string{wire.HeaderRetryAfter: "30"}},
		{"refresh unknown", refresh, service.ErrRefreshUnknown, 401, wire.MsgRefreshUnknown, nil},
		{"refresh expired", refresh, service.ErrRefreshExpired, 401, wire.MsgRefreshExpired, nil},
		{"refresh reused", refresh, service.ErrRefreshReused, 401, wire.MsgRefreshReused, nil},
		{"refresh revoked", refresh, service.ErrRefreshRevoked, 401, wire.MsgRefreshRevoked, nil},
		{"revoke sessions", route{"DELETE", "/api/v1/users/o1/sessions", apiToken, nil}, service.ErrUnknownOutcome, 503, "", nil},
		{"put desired", route{"PUT", "/api/v1/devices/d1/desired", apiToken, []byte(`{"state":{"a":1}}`)}, service.ErrOverloaded, 429, "", nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := newServer(t, &fakeService{err: tc.err}, Config{})
			a := call(t, s, tc.r.method, tc.r.path, tc.r.token, tc.r.body)
			a.wantError(t, tc.status, tc.msg)
			for k, v := range tc.headers {
				if got := a.header.Get(k); got != v {
					t.Fatalf("header %s = %q, want %q", k, got, v)
				}
			}
		})
	}
}

func TestSuccessEnvelopes(t *testing.T) {
	f := &fakeService{push: func(edge string, b *wire.PushBatch) (service.PushOutcome, error) {
		if b.FirstSeq != 3 || len(b.Changes) != 1 || b.Changes[0].Device != "d1" {
			return service.PushOutcome{}, fmt.Errorf("batch decoded as %+v", b)
		}
		return service.PushOutcome{PushResult: wire.PushResult{AckedSeq: 3, Applied: 1, RejectedStamps: 2},
			Stamps: service.StampReport{Drops: make([]service.StampDrop, 2)}}, nil
	}}
	s := newServer(t, f, Config{})
	a := call(t, s, "POST", "/sync/v1/push", edgeToken, pushBody)
	if a.status != 200 || a.env.Code != 0 || a.env.Message != "ok" {
		t.Fatalf("push: %d %s", a.status, a.raw)
	}
	var res map[string]any
	if err := json.Unmarshal(a.env.Data, &res); err != nil {
		t.Fatal(err)
	}
	// The wire result only: the stamp report is for the service's callers.
	want := map[string]any{"acked_seq": 3.0, "applied": 1.0, "duplicates": 0.0, "index": 0.0, "rejected_stamps": 2.0}
	for k, v := range want {
		if res[k] != v {
			t.Fatalf("push data %s: %s = %v, want %v", a.env.Data, k, res[k], v)
		}
	}
	if _, leaked := res["Stamps"]; leaked || len(res) != len(want) {
		t.Fatalf("push data %s has fields beyond the wire result", a.env.Data)
	}
	if f.lastEdge != "e1" {
		t.Fatalf("the service saw edge %q, want the token's e1", f.lastEdge)
	}

	a = call(t, s, "DELETE", "/api/v1/users/o1/sessions", apiToken, nil)
	if a.status != 200 || string(a.env.Data) != `{"openid":"o1","revoked_before_ms":1000,"revoked_sessions":2}` {
		t.Fatalf("revoke: %d %s", a.status, a.raw)
	}
	a = call(t, s, "GET", "/readyz", "", nil)
	if a.status != 200 || string(a.env.Data) != `{"applied_index":42,"status":"ready"}` {
		t.Fatalf("readyz: %d %s", a.status, a.raw)
	}

	// Export is NDJSON with the resume cursor in a header, not an envelope.
	f.export = func(emit func(*fsm.ExportRecord) error) (string, error) {
		for i := range 2 {
			if err := emit(&fsm.ExportRecord{Index: uint64(i + 1)}); err != nil {
				return "", err
			}
		}
		return "2", nil
	}
	a = call(t, s, "GET", "/api/v1/export", apiToken, nil)
	if a.status != 200 || a.header.Get("Content-Type") != "application/x-ndjson" || a.header.Get(hdrNextCursor) != "2" ||
		bytes.Count(a.raw, []byte("\n")) != 2 {
		t.Fatalf("export: %d %v %q", a.status, a.header, a.raw)
	}
}

func TestBodyLimits(t *testing.T) {
	s := newServer(t, &fakeService{}, Config{})
	gz := func(n int) []byte {
		var b bytes.Buffer
		w := gzip.NewWriter(&b)
		_, _ = w.Write(bytes.Repeat([]byte(" "), n))
		_ = w.Close()
		return b.Bytes()
	}
	cases := []struct {
		name   string
		path   string
		body   []byte
		hdr    []string
		status int
		msg    string
	}{
		{"gzip beyond the limit once inflated", "/sync/v1/push", gz(wire.MaxBodyBytes + 1), []string{"Content-Encoding", "gzip"}, 413,
			fmt.Sprintf("decompressed body larger than %d bytes", wire.MaxBodyBytes)},
		{"not gzip", "/sync/v1/push", []byte("plain"), []string{"Content-Encoding", "gzip"}, 400, "body is not valid gzip"},
		{"not zstd", "/sync/v1/push", []byte("plain"), []string{"Content-Encoding", "zstd"}, 400,
			"body is not valid zstd (or decompresses beyond the size limit)"},
		{"unknown encoding", "/sync/v1/push", pushBody, []string{"Content-Encoding", "br"}, 415, ""},
		{"empty", "/sync/v1/push", []byte(" "), nil, 400, "request body is empty; a JSON object is required"},
		{"trailing data", "/sync/v1/push", append(append([]byte{}, pushBody...), "{}"...), nil, 400,
			"malformed JSON body: trailing data after the object"},
		{"unknown field", "/sync/v1/push", []byte(`{"edge":"e1","bogus":1}`), nil, 400, ""},
		{"gzip policy beyond 256 KiB once inflated", "/api/v1/policies/a.rego", gz(256<<10 + 1), []string{"Content-Encoding", "gzip"}, 413, "policy larger than 256 KiB"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			method, tok := "POST", edgeToken
			if strings.HasPrefix(tc.path, "/api/") {
				method, tok = "PUT", apiToken
			}
			call(t, s, method, tc.path, tok, tc.body, tc.hdr...).wantError(t, tc.status, tc.msg)
		})
	}
	// Over the raw limit: fasthttp refuses it while reading, which app.Test
	// cannot show, so this one goes through a real listener.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = s.App().Listener(ln) }()
	// Only the headers are sent: fasthttp refuses on the declared length,
	// and a client still writing 64 MiB would race the server's close.
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "POST /sync/v1/push HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n",
		edgeToken, wire.MaxBodyBytes+1)
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	var env struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	}
	err = json.NewDecoder(resp.Body).Decode(&env)
	resp.Body.Close()
	if err != nil || resp.StatusCode != 413 || env.Code != 413 || env.Message != wire.BodyTooLarge(wire.MaxBodyBytes).Error() {
		t.Fatalf("over the raw limit: %d %+v (%v)", resp.StatusCode, env, err)
	}
	// A policy over 256 KiB is refused on its length, before it is read.
	got := exchange(t, ln.Addr().String(), fmt.Sprintf("PUT /api/v1/policies/a.rego HTTP/1.1\r\nHost: x\r\n"+
		"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n", apiToken, maxPolicyBytes+1))
	if len(got) != 1 {
		t.Fatalf("policy over 256 KiB: %+v", got)
	}
	got[0].wantError(t, 413, wire.BodyTooLarge(maxPolicyBytes).Error())

	// A gzip body within the limit reaches the service.
	f := &fakeService{}
	s = newServer(t, f, Config{})
	var b bytes.Buffer
	w := gzip.NewWriter(&b)
	_, _ = w.Write(pushBody)
	_ = w.Close()
	if a := call(t, s, "POST", "/sync/v1/push", edgeToken, b.Bytes(), "Content-Encoding", "gzip"); a.status != 200 {
		t.Fatalf("gzip push: %d %s", a.status, a.raw)
	}
}

func TestAuthHeaders(t *testing.T) {
	cases := []struct {
		name, method, path, header string
		status                     int
		msg                        string
	}{
		{"no header", "GET", "/api/v1/edges", "", 401, "missing Authorization: Bearer <token> header"},
		{"not bearer", "GET", "/api/v1/edges", "Basic " + apiToken, 401, "missing Authorization: Bearer <token> header"},
		{"unknown token", "GET", "/api/v1/edges", "Bearer nope", 401, "unknown token"},
		{"bearer is case-insensitive", "GET", "/api/v1/edges", "bearer " + apiToken, 200, ""},
		{"edge token on the consumer API", "GET", "/api/v1/edges", "Bearer " + edgeToken, 403,
			"the consumer API takes the API token (-api-token)"},
		{"admin user on the consumer API", "GET", "/api/v1/edges", "Bearer " + adminJWT, 200, ""},
		{"viewer user on the consumer API", "GET", "/api/v1/edges", "Bearer " + viewerJWT, 403, ""},
		{"API token on the sync API", "GET", "/sync/v1/pull", "Bearer " + apiToken, 403,
			"the sync API takes an edge token (-edge-token)"},
		{"edge token on the sync API", "GET", "/sync/v1/pull", "Bearer " + edgeToken, 200, ""},
		{"cluster change without a token", "POST", "/cluster/v1/snapshot", "", 401, ""},
		{"cluster change with the API token", "POST", "/cluster/v1/snapshot", "Bearer " + apiToken, 200, ""},
		{"status needs a credential", "GET", "/cluster/v1/status", "", 401, ""},
		{"status with the API token", "GET", "/cluster/v1/status", "Bearer " + apiToken, 200, ""},
		{"status refuses an admin user", "GET", "/cluster/v1/status", "Bearer " + adminJWT, 403, ""},
		{"login is open", "POST", "/api/v1/auth/login", "", 200, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeService{}
			s := newServer(t, f, Config{})
			var body []byte
			if tc.method == "POST" && strings.Contains(tc.path, "login") {
				body = []byte(`{"code":"c"}`)
			}
			var hdr []string
			if tc.header != "" {
				hdr = []string{"Authorization", tc.header}
			}
			a := call(t, s, tc.method, tc.path, "", body, hdr...)
			if tc.status != 200 {
				a.wantError(t, tc.status, tc.msg)
				if len(f.Calls()) != 0 {
					t.Fatalf("a refused request reached the service: %v", f.Calls())
				}
				return
			}
			if a.status != 200 {
				t.Fatalf("%d %s, want 200", a.status, a.raw)
			}
		})
	}
	// The sync API hands the service the token's edge.
	f := &fakeService{}
	s := newServer(t, f, Config{})
	call(t, s, "GET", "/sync/v1/pull", edgeToken, nil)
	if f.lastEdge != "e1" {
		t.Fatalf("pull for edge %q, want e1", f.lastEdge)
	}
}

func TestReads(t *testing.T) {
	f := &fakeService{}
	s := newServer(t, f, Config{})
	call(t, s, "GET", "/api/v1/devices/d1", apiToken, nil)
	call(t, s, "GET", "/api/v1/devices/d1?consistency=strong", apiToken, nil)
	if got := f.Calls(); !slices.Equal(got, []string{"Device", "Barrier", "Device"}) {
		t.Fatalf("calls %v: a strong read runs the barrier first, a local one does not", got)
	}
	call(t, s, "GET", "/api/v1/devices/d1?consistency=eventual", apiToken, nil).
		wantError(t, 400, "consistency must be strong or local")
	call(t, s, "GET", "/api/v1/devices/bad%20id", apiToken, nil).wantError(t, 400, "")
	call(t, s, "GET", "/nowhere", "", nil).wantError(t, 404, "no route for GET /nowhere")
}

// TestFollowerForwards runs a follower and a leader on real listeners: the
// follower relays a write to the leader and its answer (status, envelope,
// the expected-seq header) back, without calling its own service.
func TestFollowerForwards(t *testing.T) {
	leaderSvc := &fakeService{err: &service.SeqGapError{Edge: "e1", First: 3, Expected: 5}}
	leader := newServer(t, leaderSvc, Config{NodeID: "n1"})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = leader.App().Listener(ln) }()

	followerSvc := &fakeService{follower: true, leaderID: "n1", leaderAddr: ln.Addr().String()}
	follower := newServer(t, followerSvc, Config{NodeID: "n2"})
	a := call(t, follower, "POST", "/sync/v1/push", edgeToken, pushBody)
	a.wantError(t, 409, `sequence gap: the cloud expects sequence 5 next from edge "e1", batch starts at 3`)
	if a.header.Get(wire.HeaderExpectedSeq) != "5" {
		t.Fatalf("the forwarded answer lost %s: %v", wire.HeaderExpectedSeq, a.header)
	}
	if got, want := a.header.Get(wire.HeaderLeader), "http://"+ln.Addr().String(); got != want {
		t.Fatalf("forwarded answer names leader %q, want %q", got, want)
	}
	if len(followerSvc.Calls()) != 0 || !slices.Equal(leaderSvc.Calls(), []string{"Push"}) {
		t.Fatalf("follower calls %v, leader calls %v: want the push on the leader only", followerSvc.Calls(), leaderSvc.Calls())
	}

	// With no leader known, a write gives up after ForwardTimeout.
	lost := newServer(t, &fakeService{follower: true}, Config{NodeID: "n2", ForwardTimeout: 50 * time.Millisecond})
	a = call(t, lost, "POST", "/sync/v1/push", edgeToken, pushBody)
	a.wantError(t, 503, "no raft leader is reachable right now (election in progress or quorum lost); retry shortly")
	if a.header.Get(wire.HeaderRetryAfter) != "1" {
		t.Fatalf("no Retry-After on 503: %v", a.header)
	}
}

// TestNotLeaderRetries: a write that finds leadership gone mid-call
// (ErrNotLeader, here wrapping raftnode's) is retried, not answered 500.
func TestNotLeaderRetries(t *testing.T) {
	tries := 0
	f := &fakeService{push: func(string, *wire.PushBatch) (service.PushOutcome, error) {
		if tries++; tries < 3 {
			return service.PushOutcome{}, fmt.Errorf("%w (%w)", service.ErrNotLeader, raftnode.ErrNotLeader)
		}
		return service.PushOutcome{PushResult: wire.PushResult{AckedSeq: 3}}, nil
	}}
	s := newServer(t, f, Config{})
	if a := call(t, s, "POST", "/sync/v1/push", edgeToken, pushBody); a.status != 200 || tries != 3 {
		t.Fatalf("%d %s after %d tries, want 200 on the third", a.status, a.raw, tries)
	}
}

type admittedKey struct{}

// TestPushAdmissionBeforeDecoding: a push is admitted by its body's size
// before the body is decompressed or decoded, so a refused one costs no
// decoding (even a malformed body is answered 429, not 400); an admitted
// one is pushed with the admission's context, and its admission is
// released once the request is answered.
func TestPushAdmissionBeforeDecoding(t *testing.T) {
	var sizes []int
	var mu sync.Mutex
	released := 0
	refuse := true
	f := &fakeService{}
	f.admit = func(ctx context.Context, size int) (context.Context, func(), error) {
		mu.Lock()
		defer mu.Unlock()
		sizes = append(sizes, size)
		if refuse {
			return ctx, func() {}, &service.OverloadedError{RetryAfter: 2 * time.Second}
		}
		return context.WithValue(ctx, admittedKey{}, true), func() { mu.Lock(); released++; mu.Unlock() }, nil
	}
	var admitted bool
	f.pushCtx = func(ctx context.Context) { admitted, _ = ctx.Value(admittedKey{}).(bool) }
	s := newServer(t, f, Config{})

	a := call(t, s, "POST", "/sync/v1/push", edgeToken, []byte(`{not json`))
	a.wantError(t, 429, "")
	if got := a.header.Get(wire.HeaderRetryAfter); got != "2" {
		t.Fatalf("Retry-After %q, want the queue's estimate, 2", got)
	}
	if slices.Contains(f.Calls(), "Push") {
		t.Fatal("a refused push reached the service's Push")
	}

	mu.Lock()
	refuse = false
	mu.Unlock()
	call(t, s, "POST", "/sync/v1/push", edgeToken, pushBody)
	mu.Lock()
	defer mu.Unlock()
	if !admitted || released != 1 {
		t.Fatalf("admitted push: pushed with the admission's context %v, released %d times; want true, 1", admitted, released)
	}
	if len(sizes) != 2 || sizes[0] != len(`{not json`) || sizes[1] != len(pushBody) {
		t.Fatalf("admission asked with sizes %v, want the bodies' sizes", sizes)
	}
}
