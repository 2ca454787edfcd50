package differential

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
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/pkg/api"
	"github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/cloud"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/policy"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// The same requests, black-box, against a real edge API (its store, token
// service and shipped policies) and a real one-node cloud: refusals must
// carry the same status and message, and the nearest-edge item the same
// bytes.

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// daemon is one HTTP API under test with the credential that may write.
type daemon struct {
	name, base, token string
	client            *http.Client
}

type answer struct {
	status int
	env    wire.Envelope[json.RawMessage]
}

func (d *daemon) do(t *testing.T, method, path, body string) answer {
	t.Helper()
	req, err := http.NewRequest(method, d.base+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+d.token)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	var resp *http.Response
	if len(body) > wire.MaxRequestBytes {
		resp, err = sendRefused(req)
	} else {
		resp, err = d.client.Do(req)
	}
	if err != nil {
		t.Fatalf("%s %s %s: %v", d.name, method, path, err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	a := answer{status: resp.StatusCode}
	if err := json.Unmarshal(raw, &a.env); err != nil {
		t.Fatalf("%s %s %s: %d, not an envelope: %.200s", d.name, method, path, resp.StatusCode, raw)
	}
	return a
}

// sendRefused sends a request whose body a server refuses before reading it:
// the body is written in the background, its write errors ignored, while the
// answer is read, so a server that answers 413 and closes cannot turn the
// answer into a client-side "connection reset".
func sendRefused(req *http.Request) (*http.Response, error) {
	conn, err := net.Dial("tcp", req.URL.Host)
	if err != nil {
		return nil, err
	}
	go func() { _ = req.Write(conn) }()
	resp, err := http.ReadResponse(bufio.NewReader(conn), req)
	if err != nil {
		conn.Close()
		return nil, err
	}
	resp.Body = struct {
		io.Reader
		io.Closer
	}{resp.Body, conn}
	return resp, nil
}

// location of the edge under test, in its config and in its heartbeat.
var here = wire.Location{Lat: 31.23, Lng: 121.47}

const advertise = "https://e1.example"

func startEdge(t *testing.T) *daemon {
	t.Helper()
	dir := t.TempDir()
	st, err := store.Open(filepath.Join(dir, "edge.db"), store.Options{EdgeID: "e1", Region: "north", Clock: hlc.NewClock(nil, time.Minute), NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = st.Close() })
	keys, err := auth.OpenKeyring(filepath.Join(dir, "keys"), nil)
	if err != nil {
		t.Fatal(err)
	}
	tokens, err := auth.NewService(keys, st.DB(), auth.Config{Issuer: "e1"})
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	engine, err := policy.New(t.Context(), policy.Config{Dir: filepath.Join("..", "..", "policies"), Registerer: reg, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	loc := here
	// The default body limit: the one the cloud's consumer routes share.
	srv, err := api.New(api.Config{EdgeID: "e1", Region: "north", Location: &loc, Advertise: advertise, Admins: []string{"root"}, Logger: quiet},
		api.Deps{Store: st, Tokens: tokens, Policy: engine, Registerer: reg, Gatherer: reg, DataChanged: engine.InvalidateData})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	pair, err := tokens.Issue(t.Context(), "root")
	if err != nil {
		t.Fatal(err)
	}
	d := &daemon{name: "edge", base: "http://" + ln.Addr().String(), token: pair.AccessToken, client: &http.Client{Timeout: 10 * time.Second}}
	waitServing(t, d.client, d.base+"/healthz")
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		<-served
	})
	return d
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func startCloud(t *testing.T) *daemon {
	t.Helper()
	// Tokens of 32+ characters: cloud-sync refuses shorter ones.
	const apiToken, edgeToken = "api-secret-0123456789abcdef0123456789", "edge-secret-0123456789abcdef012345678"
	cfg, err := cloud.Parse([]string{"-id", "n1", "-bootstrap", "-data", t.TempDir(),
		"-raft", freeAddr(t), "-http", freeAddr(t), "-api-token", apiToken, "-edge-token", "e1=" + edgeToken,
		"-dev-login", "-admin", "root",
		"-heartbeat-timeout", "50ms", "-election-timeout", "50ms", "-leader-lease-timeout", "50ms"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	node, err := cloud.Start(cfg, quiet)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- node.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-ran
		_ = node.Shutdown(5 * time.Second)
	})
	d := &daemon{name: "cloud", base: "http://" + cfg.HTTP, token: apiToken, client: &http.Client{Timeout: 10 * time.Second}}
	waitServing(t, d.client, d.base+"/readyz")
	// The edge announces itself as it would: the cloud's directory then
	// holds what the standalone edge knows of itself.
	hb, _ := json.Marshal(wire.Heartbeat{Edge: "e1", Region: "north", Location: &here, Advertise: advertise})
	edge := &daemon{name: "cloud sync", base: d.base, token: edgeToken, client: d.client}
	if a := edge.do(t, http.MethodPost, wire.PathHeartbeat, string(hb)); a.status != http.StatusOK {
		t.Fatalf("heartbeat: %d %s", a.status, a.env.Message)
	}
	return d
}

func waitServing(t *testing.T, c *http.Client, url string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; {
		resp, err := c.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
			err = errors.New(resp.Status)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not ready: %v", url, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func strs(n int, f func(i int) string) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = f(i)
	}
	return out
}

func jsonOf(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func stateWith(fields int, valueBytes int) string {
	s := map[string]string{}
	for i := range fields {
		s[fmt.Sprintf("f%d", i)] = strings.Repeat("v", valueBytes)
	}
	return jsonOf(map[string]any{"state": s})
}

func TestEdgeAndCloudAPIsAgree(t *testing.T) {
	edge, cloudAPI := startEdge(t), startCloud(t)
	tags := map[string]string{}
	for i := range wire.MaxTags + 1 {
		tags[fmt.Sprintf("k%d", i)] = "v"
	}
	tests := []struct {
		name, method, path, body string
		status                   int
	}{
		{"nearest NaN", "GET", "/api/v1/edges/nearest?lat=NaN&lng=NaN", "", 400},
		{"nearest lat NaN", "GET", "/api/v1/edges/nearest?lat=nan&lng=0", "", 400},
		{"nearest lng Inf", "GET", "/api/v1/edges/nearest?lat=0&lng=Inf", "", 400},
		{"nearest lng -Inf", "GET", "/api/v1/edges/nearest?lat=0&lng=-Inf", "", 400},
		{"nearest overflow", "GET", "/api/v1/edges/nearest?lat=1e400&lng=0", "", 400},
		{"nearest lat out of range", "GET", "/api/v1/edges/nearest?lat=90.5&lng=0", "", 400},
		{"nearest lng out of range", "GET", "/api/v1/edges/nearest?lat=0&lng=-181", "", 400},
		{"nearest without lat", "GET", "/api/v1/edges/nearest?lng=1", "", 400},
		{"nearest bad limit", "GET", "/api/v1/edges/nearest?lat=0&lng=0&limit=101", "", 400},
		{"readings bad from", "GET", "/api/v1/devices/d1/readings?from=yesterday", "", 400},
		{"readings negative to", "GET", "/api/v1/devices/d1/readings?to=-5", "", 400},
		{"readings zero limit", "GET", "/api/v1/devices/d1/readings?limit=0", "", 400},
		{"readings bad cursor", "GET", "/api/v1/devices/d1/readings?cursor=a%20b", "", 400},
		{"meta too many owners", "PUT", "/api/v1/devices/d1/meta", jsonOf(map[string]any{"owners": strs(wire.MaxOwners+1, func(i int) string { return fmt.Sprintf("o%d", i) })}), 400},
		{"meta bad owner", "PUT", "/api/v1/devices/d1/meta", `{"owners":["a/b"]}`, 400},
		{"meta too many tags", "PUT", "/api/v1/devices/d1/meta", jsonOf(map[string]any{"tags": tags}), 400},
		{"meta bad tag key", "PUT", "/api/v1/devices/d1/meta", `{"tags":{"a b":"c"}}`, 400},
		{"meta long tag value", "PUT", "/api/v1/devices/d1/meta", jsonOf(map[string]any{"tags": map[string]string{"k": strings.Repeat("v", wire.MaxTagValue+1)}}), 400},
		{"meta bad region", "PUT", "/api/v1/devices/d1/meta", `{"region":"no/where"}`, 400},
		{"desired empty", "PUT", "/api/v1/devices/d1/desired", `{"state":{}}`, 400},
		{"desired too many fields", "PUT", "/api/v1/devices/d1/desired", stateWith(wire.MaxStateFields+1, 1), 400},
		{"desired value over the limit", "PUT", "/api/v1/devices/d1/desired", stateWith(1, wire.MaxValueBytes+1), 413},
		{"desired 1 MiB value", "PUT", "/api/v1/devices/d1/desired", stateWith(1, 1<<20), 413},
		{"desired 5 MB value", "PUT", "/api/v1/devices/d1/desired", stateWith(1, 5_000_000), 413},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := edge.do(t, tc.method, tc.path, tc.body)
			c := cloudAPI.do(t, tc.method, tc.path, tc.body)
			if e.status != tc.status || c.status != tc.status {
				t.Fatalf("status: edge %d %q, cloud %d %q; want %d", e.status, e.env.Message, c.status, c.env.Message, tc.status)
			}
			if e.env.Message != c.env.Message || e.env.Code != c.env.Code || e.env.Code != tc.status {
				t.Fatalf("envelopes differ:\n edge  %d %q\n cloud %d %q", e.env.Code, e.env.Message, c.env.Code, c.env.Message)
			}
		})
	}

	// An older edge syncs tags as a "key=value" list; the cloud (whose sync
	// decoder is not encoding/json) still takes it, and answers an object.
	// The change carries an admin's cloud-issued token, the proof the cloud
	// accepts an edge's meta change on (edge restriction).
	t.Run("old tag list from an edge", func(t *testing.T) {
		var pair struct {
			AccessToken string `json:"access_token"`
		}
		login := cloudAPI.do(t, "POST", "/api/v1/auth/login", `{"code":"dev:root"}`)
		if err := json.Unmarshal(login.env.Data, &pair); err != nil || login.status != 200 || pair.AccessToken == "" {
			t.Fatalf("cloud login: %d %s", login.status, login.env.Message)
		}
		sync := &daemon{name: "cloud sync", base: cloudAPI.base, token: "edge-secret-0123456789abcdef012345678", client: cloudAPI.client}
		stamp := hlc.New(time.Now().UnixMilli(), 0).String()
		body := `{"edge":"e1","changes":[{"kind":"meta","device":"d9","meta":{"owners":["o1"],"tags":["floor=3","wing="],"stamp":"` + stamp +
			`"},"actor":"root","proof":"` + pair.AccessToken + `"}]}`
		if a := sync.do(t, "POST", wire.PathState, body); a.status != 200 {
			t.Fatalf("state push: %d %s", a.status, a.env.Message)
		}
		a := cloudAPI.do(t, "GET", "/api/v1/devices/d9?consistency=strong", "")
		var d struct{ Tags map[string]string }
		if err := json.Unmarshal(a.env.Data, &d); err != nil || a.status != 200 || len(d.Tags) != 2 || d.Tags["floor"] != "3" || d.Tags["wing"] != "" {
			t.Fatalf("device: %d %s", a.status, a.env.Data)
		}
	})

	t.Run("nearest item", func(t *testing.T) {
		path := "/api/v1/edges/nearest?lat=31.2&lng=121.5"
		e, c := edge.do(t, "GET", path, ""), cloudAPI.do(t, "GET", path, "")
		if e.status != 200 || c.status != 200 {
			t.Fatalf("edge %d %q, cloud %d %q", e.status, e.env.Message, c.status, c.env.Message)
		}
		if !bytes.Equal(e.env.Data, c.env.Data) {
			t.Fatalf("items differ:\n edge  %s\n cloud %s", e.env.Data, c.env.Data)
		}
		var v struct{ Items []map[string]json.RawMessage }
		if err := json.Unmarshal(e.env.Data, &v); err != nil || len(v.Items) != 1 {
			t.Fatalf("items %s: %v", e.env.Data, err)
		}
		for _, k := range []string{"id", "url", "region", "location", "distance_km", "healthy", "lag_ms", "backlog"} {
			if _, ok := v.Items[0][k]; !ok {
				t.Errorf("item has no %q: %s", k, e.env.Data)
			}
		}
	})
}
