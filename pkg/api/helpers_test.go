package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/policy"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/wechat"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// t0 is the base time of seeded readings (Unix ms).
const t0 = int64(1732170000000)

// secretSessionKey is what the fake WeChat returns as session_key; it must
// never appear in a response.
const secretSessionKey = "SESSION-KEY-MUST-NOT-LEAK"

// internalMarker is the text of errors from fakes standing in for storage
// or upstream failures; it must never reach a client.
const internalMarker = "bolt: page 4242 corrupt at /var/lib/secret"

// testEnv is an API on a loopback listener over a real store, token
// service and policy engine.
type testEnv struct {
	t        *testing.T
	srv      *Server
	base     string
	store    *store.Store
	tokens   *auth.Service
	engine   *policy.Engine
	downlink *fakeDownlink
	dir      *fakeDirectory
	sync     *fakeSync
	ready    atomic.Pointer[string]
	clock    *testClock
	client   *http.Client
	dataDir  string
}

type envOpt func(*Config, *Deps)

// testClock is time.Now shifted by an adjustable offset.
type testClock struct{ off atomic.Int64 }

func (c *testClock) now() time.Time        { return time.Now().Add(time.Duration(c.off.Load())) }
func (c *testClock) shift(d time.Duration) { c.off.Store(int64(d)) }
func (c *testClock) reset()                { c.off.Store(0) }
func (c *testClock) set(t *testing.T, d time.Duration) {
	t.Helper()
	c.shift(d)
	t.Cleanup(c.reset)
}

func newEnv(t *testing.T, opts ...envOpt) *testEnv {
	t.Helper()
	dataDir := t.TempDir()
	st, err := store.Open(filepath.Join(dataDir, "edge.db"), store.Options{
		EdgeID: "edge-1", Region: "north", Clock: hlc.NewClock(nil, 5*time.Minute), MaxDeadLetters: 100,
	})
	if err != nil {
		t.Fatalf("store.Open: %v", err)
	}
	t.Cleanup(func() { st.Close() })
	keys, err := auth.OpenKeyring(filepath.Join(dataDir, "keys"), nil)
	if err != nil {
		t.Fatalf("OpenKeyring: %v", err)
	}
	clock := &testClock{}
	tokens, err := auth.NewService(keys, st.DB(), auth.Config{Issuer: "edge-1", Now: clock.now, Leeway: time.Second})
	if err != nil {
		t.Fatalf("auth.NewService: %v", err)
	}
	reg := prometheus.NewRegistry()
	engine, err := policy.New(context.Background(), policy.Config{Dir: filepath.Join("..", "..", "policies"), Registerer: reg, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatalf("policy.New: %v", err)
	}
	e := &testEnv{
		t: t, store: st, tokens: tokens, engine: engine, clock: clock, dataDir: dataDir,
		downlink: &fakeDownlink{}, dir: nil, sync: &fakeSync{},
	}
	cfg := Config{
		EdgeID: "edge-1", Region: "north", Location: &Location{Lat: 31.23, Lng: 121.47},
		Advertise: "https://edge-1.example", Admins: []string{"root"}, DevLogin: true,
		MaxPage: 50, BodyLimit: 8 << 10, Now: clock.now,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	deps := Deps{
		Store: st, Tokens: tokens, Policy: engine, Downlink: e.downlink, Sync: e.sync,
		Ready: func() string {
			if p := e.ready.Load(); p != nil {
				return *p
			}
			return ""
		},
		Registerer: reg, Gatherer: reg, DataChanged: engine.InvalidateData,
	}
	for _, o := range opts {
		o(&cfg, &deps)
	}
	srv, err := New(cfg, deps)
	if err != nil {
		t.Fatalf("api.New: %v", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	e.srv = srv
	e.base = "http://" + ln.Addr().String()
	tr := &http.Transport{MaxIdleConnsPerHost: 4}
	e.client = &http.Client{Transport: tr, Timeout: 30 * time.Second}
	// Wait until the server accepts: fasthttp's Shutdown does not stop a
	// Serve that has not registered its listener yet, and a test that ends
	// at once (cleanup racing the Serve goroutine) would hang forever.
	for deadline := time.Now().Add(10 * time.Second); ; {
		resp, err := e.client.Get(e.base + "/__serving") // a 404; no test counts those
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("api server not serving: %v", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Cleanup(func() {
		tr.CloseIdleConnections()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return e
}

func withConfig(f func(*Config)) envOpt { return func(c *Config, _ *Deps) { f(c) } }
func withDeps(f func(*Deps)) envOpt     { return func(_ *Config, d *Deps) { f(d) } }

// response is a decoded API answer.
type response struct {
	status int
	header http.Header
	body   []byte
	env    struct {
		Code    int             `json:"code"`
		Message string          `json:"message"`
		Data    json.RawMessage `json:"data"`
	}
}

// data decodes the envelope's data into v.
func (r *response) data(t *testing.T, v any) {
	t.Helper()
	if err := json.Unmarshal(r.env.Data, v); err != nil {
		t.Fatalf("decode data %s: %v", r.env.Data, err)
	}
}

func (r *response) String() string { return fmt.Sprintf("%d %s", r.status, r.body) }

// req is one request to make.
type req struct {
	method, path, token string
	body                any // string, []byte or a value to encode as JSON
	header              map[string]string
}

// do sends rq and checks the envelope contract on the answer: exactly the
// keys code, message and data; code 0 and "ok" on success; on error code
// equal to the status, data null, a message, and for 5xx no internals.
func (e *testEnv) do(rq req) *response {
	e.t.Helper()
	return doOn(e.t, e, rq)
}

func doOn(t *testing.T, e *testEnv, rq req) *response {
	t.Helper()
	var body io.Reader
	switch b := rq.body.(type) {
	case nil:
	case string:
		body = strings.NewReader(b)
	case []byte:
		body = bytes.NewReader(b)
	default:
		j, err := json.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		body = bytes.NewReader(j)
	}
	if rq.method == "" {
		rq.method = http.MethodGet
	}
	hr, err := http.NewRequest(rq.method, e.base+rq.path, body)
	if err != nil {
		t.Fatalf("NewRequest %s: %v", rq.path, err)
	}
	if body != nil {
		hr.Header.Set("Content-Type", "application/json")
	}
	if rq.token != "" {
		hr.Header.Set("Authorization", "Bearer "+rq.token)
	}
	for k, v := range rq.header {
		hr.Header.Set(k, v)
	}
	hresp, err := e.client.Do(hr)
	if err != nil {
		t.Fatalf("%s %s: %v", rq.method, rq.path, err)
	}
	defer hresp.Body.Close()
	r := &response{status: hresp.StatusCode, header: hresp.Header}
	if r.body, err = io.ReadAll(hresp.Body); err != nil {
		t.Fatalf("%s %s: read body: %v", rq.method, rq.path, err)
	}
	checkEnvelope(t, rq, r)
	return r
}

func checkEnvelope(t *testing.T, rq req, r *response) {
	t.Helper()
	where := rq.method + " " + truncate(rq.path)
	if ct := r.header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
		t.Fatalf("%s: Content-Type %q, want application/json; body %s", where, ct, r.body)
	}
	var keys map[string]json.RawMessage
	if err := json.Unmarshal(r.body, &keys); err != nil {
		t.Fatalf("%s: body is not a JSON object: %v: %s", where, err, r.body)
	}
	if len(keys) != 3 || keys["code"] == nil || keys["message"] == nil || keys["data"] == nil {
		t.Fatalf("%s: envelope keys: %s", where, r.body)
	}
	if err := json.Unmarshal(r.body, &r.env); err != nil {
		t.Fatalf("%s: envelope: %v: %s", where, err, r.body)
	}
	if r.status < 400 {
		if r.env.Code != 0 || r.env.Message != "ok" {
			t.Fatalf("%s: success envelope %s", where, r.body)
		}
		return
	}
	if r.env.Code != r.status || r.env.Message == "" || string(r.env.Data) != "null" {
		t.Fatalf("%s: error envelope for status %d: %s", where, r.status, r.body)
	}
	if r.status >= 500 {
		for _, leak := range []string{"bolt", "secret", "panic", "goroutine", ".go:", internalMarker, "runtime error"} {
			if strings.Contains(string(r.body), leak) {
				t.Fatalf("%s: 5xx body leaks %q: %s", where, leak, r.body)
			}
		}
	}
	if strings.Contains(string(r.body), secretSessionKey) {
		t.Fatalf("%s: body leaks the WeChat session key: %s", where, r.body)
	}
}

// expect sends rq and fails unless the status is want.
func (e *testEnv) expect(rq req, want int) *response {
	e.t.Helper()
	r := e.do(rq)
	if r.status != want {
		e.t.Fatalf("%s %s: status %d, want %d; body %s", rq.method, truncate(rq.path), r.status, want, r.body)
	}
	return r
}

// login logs openid in with dev login and returns its token pair.
func (e *testEnv) login(openid string) auth.Pair {
	e.t.Helper()
	r := e.expect(req{method: http.MethodPost, path: "/api/v1/auth/login", body: map[string]string{"code": "dev:" + openid}}, 200)
	var p auth.Pair
	r.data(e.t, &p)
	if p.AccessToken == "" || p.RefreshToken == "" || p.OpenID != openid || p.ExpiresIn <= 0 {
		e.t.Fatalf("login pair: %s", r.env.Data)
	}
	return p
}

// token issues an access token for openid directly.
func (e *testEnv) token(openid string) string {
	e.t.Helper()
	p, err := e.tokens.Issue(context.Background(), openid)
	if err != nil {
		e.t.Fatalf("Issue: %v", err)
	}
	return p.AccessToken
}

func (e *testEnv) putUser(openid string, roles, regions []string) {
	e.t.Helper()
	if err := e.store.PutUser(store.User{OpenID: openid, Roles: roles, Regions: regions}); err != nil {
		e.t.Fatalf("PutUser: %v", err)
	}
	e.engine.InvalidateData()
}

// seed registers device with n readings one second apart from t0, metrics
// temp = i and hum = 2i.
func (e *testEnv) seed(device string, n int) {
	e.t.Helper()
	it := store.Item{Device: device, ReceivedAt: t0}
	for i := range n {
		it.Readings = append(it.Readings, store.Reading{TS: t0 + int64(i)*1000, ID: fmt.Sprintf("m%d", i),
			Metrics: []store.Metric{{Name: "temp", Value: float64(i)}, {Name: "hum", Value: float64(2 * i)}}})
	}
	if n == 0 {
		it.State = map[string]json.RawMessage{"fw": json.RawMessage(`"1.0"`)}
	}
	if _, err := e.store.Ingest([]store.Item{it}, nil); err != nil {
		e.t.Fatalf("Ingest: %v", err)
	}
}

func (e *testEnv) setMeta(device, region string, owners ...string) {
	e.t.Helper()
	if owners == nil {
		owners = []string{}
	}
	if _, err := e.store.SetMeta(device, store.DeviceMeta{Owners: owners, Region: region}); err != nil {
		e.t.Fatalf("SetMeta: %v", err)
	}
	e.engine.InvalidateData()
}

// fakeDownlink records publishes.
type fakeDownlink struct {
	mu   sync.Mutex
	msgs []published
	err  error
}

type published struct {
	topic   string
	payload []byte
	retain  bool
	qos     byte
}

func (f *fakeDownlink) Publish(topic string, payload []byte, retain bool, qos byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.msgs = append(f.msgs, published{topic, append([]byte(nil), payload...), retain, qos})
	return f.err
}

func (f *fakeDownlink) all() []published {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]published(nil), f.msgs...)
}

// fakeSync is a fixed cloud status.
type fakeSync struct{ st atomic.Pointer[linkStatus] }

type linkStatus struct {
	connected bool
	lastSync  time.Time
}

func (f *fakeSync) Status() (bool, time.Time) {
	if p := f.st.Load(); p != nil {
		return p.connected, p.lastSync
	}
	return false, time.Time{}
}

// fakeDirectory answers Edges with edges, an error or a panic.
type fakeDirectory struct {
	edges []wire.Edge
	err   error
	panic bool
}

func (f *fakeDirectory) Edges(context.Context) ([]wire.Edge, error) {
	if f.panic {
		panic("directory exploded: " + internalMarker)
	}
	if f.err != nil {
		return nil, f.err
	}
	return f.edges, nil
}

// failingStore is the real store with chosen methods failing or panicking
// for device ids starting with "boom".
type failingStore struct {
	*store.Store
}

func (f failingStore) Device(id string) (*store.Device, error) {
	switch {
	case strings.HasPrefix(id, "boom-panic"):
		panic("store exploded: " + internalMarker)
	case strings.HasPrefix(id, "boom"):
		return nil, errors.New(internalMarker)
	}
	return f.Store.Device(id)
}

// fakeWeChat is a code2session server: the code chooses the answer.
type fakeWeChat struct {
	srv     *httptest.Server
	release chan struct{}
	calls   atomic.Int64
}

func newFakeWeChat(t *testing.T) *fakeWeChat {
	t.Helper()
	f := &fakeWeChat{release: make(chan struct{})}
	f.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.calls.Add(1)
		if r.URL.Path != "/sns/jscode2session" || r.URL.Query().Get("appid") != "wx-app" || r.URL.Query().Get("secret") != "wx-secret" {
			http.Error(w, "bad request", http.StatusBadRequest)
			return
		}
		code := r.URL.Query().Get("js_code")
		w.Header().Set("Content-Type", "application/json")
		switch {
		case strings.HasPrefix(code, "ok-"):
			fmt.Fprintf(w, `{"openid":%q,"session_key":%q,"unionid":"u-1"}`, strings.TrimPrefix(code, "ok-"), secretSessionKey)
		case code == "invalid":
			fmt.Fprint(w, `{"errcode":40029,"errmsg":"invalid code"}`)
		case code == "ratelimited":
			fmt.Fprint(w, `{"errcode":45011,"errmsg":"api minute-quota reach limit"}`)
		case code == "blocked":
			fmt.Fprint(w, `{"errcode":40226,"errmsg":"high risk user"}`)
		case code == "busy":
			fmt.Fprint(w, `{"errcode":-1,"errmsg":"system error"}`)
		case code == "weird":
			fmt.Fprintf(w, `{"errcode":99999,"errmsg":%q}`, internalMarker)
		case code == "down":
			http.Error(w, internalMarker, http.StatusBadGateway)
		case code == "slow":
			select { // hold the answer until the client gives up
			case <-r.Context().Done():
			case <-f.release:
			}
		default:
			fmt.Fprint(w, `{"errcode":40163,"errmsg":"code been used"}`)
		}
	}))
	t.Cleanup(func() { close(f.release); f.srv.Close() })
	return f
}

// withWeChat wires a WeChatLogin against a fake code2session server.
func withWeChat(t *testing.T, fw *fakeWeChat) envOpt {
	return func(c *Config, d *Deps) {
		wc, err := wechat.New(wechat.Config{APIBase: fw.srv.URL, AppID: "wx-app", Secret: "wx-secret", Timeout: 300 * time.Millisecond})
		if err != nil {
			t.Fatalf("wechat.New: %v", err)
		}
		d.Login = WeChatLogin{Client: wc, Tokens: d.Tokens}
	}
}
