package httpapi

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/internal/devcerts"
	"github.com/outpost-edge/outpost/pkg/certs"
	"github.com/outpost-edge/outpost/pkg/cloud/auth"
)

const metricsToken = "metrics-token-0123"

// securityServer is a server over f whose API token is apiTok ("": none).
func securityServer(t *testing.T, f *fakeService, cfg Config, apiTok string) *Server {
	t.Helper()
	static, err := auth.NewStatic(map[string]string{"e1": edgeToken}, apiTok)
	if err != nil {
		t.Fatal(err)
	}
	cfg.NodeID, cfg.HasAPIToken = "n1", apiTok != ""
	s, err := New(cfg, f, auth.Chain{static, users{}}, slog.New(slog.NewTextHandler(io.Discard, nil)), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Shutdown(context.Background()) })
	return s
}

// deadJoin names a raft address nobody answers: accepted, it would add a
// voter that never votes.
const deadJoin = `{"id":"ghost","raft_addr":"10.255.255.1:7000","http_addr":"10.255.255.1:8090"}`

// TestSecurityMembershipNeedsCredential: finding 8 — without -api-token,
// POST /cluster/v1/join was open, and one join naming a dead address broke
// quorum for good. Membership changes (join, remove, snapshot) need the
// service token or a cluster certificate in every mode; a node that has
// neither configured refuses them and says what to configure. User tokens
// (even an admin's) and edge tokens do not count.
func TestSecurityMembershipNeedsCredential(t *testing.T) {
	calls := []struct{ method, path, body string }{
		{"POST", "/cluster/v1/join", deadJoin},
		{"DELETE", "/cluster/v1/nodes/n2", ""},
		{"POST", "/cluster/v1/snapshot", ""},
	}
	modes := []struct {
		name     string
		apiToken string
		cluster  bool
		token    string
		status   int
		msg      string
	}{
		{"no credential configured, none sent", "", false, "", 403, "start cloud-sync with -api-token"},
		{"no credential configured, a guess sent", "", false, "anything-at-all", 403, "start cloud-sync with -api-token"},
		{"cluster TLS only, no certificate", "", true, "", 401, "cluster certificate"},
		{"API token configured, none sent", apiToken, false, "", 401, "API token"},
		{"API token configured, wrong one", apiToken, false, "wrong-token-123", 401, "unknown token"},
		{"edge token", apiToken, false, edgeToken, 403, "API token"},
		{"admin user", apiToken, true, adminJWT, 403, "API token"},
	}
	for _, m := range modes {
		for _, cl := range calls {
			t.Run(m.name+" "+cl.method+" "+cl.path, func(t *testing.T) {
				f := &fakeService{}
				s := securityServer(t, f, Config{ClusterTLS: m.cluster}, m.apiToken)
				var body []byte
				if cl.body != "" {
					body = []byte(cl.body)
				}
				a := call(t, s, cl.method, cl.path, m.token, body)
				if a.status != m.status || !strings.Contains(a.env.Message, m.msg) {
					t.Fatalf("%d %s, want %d with a message naming %q", a.status, a.raw, m.status, m.msg)
				}
				if got := f.Calls(); len(got) != 0 {
					t.Fatalf("the refused call reached the service: %v", got)
				}
			})
		}
	}
	t.Run("the API token is accepted", func(t *testing.T) {
		f := &fakeService{}
		s := securityServer(t, f, Config{}, apiToken)
		if a := call(t, s, "POST", "/cluster/v1/join", apiToken, []byte(deadJoin)); a.status != 200 {
			t.Fatalf("join with the API token: %d %s", a.status, a.raw)
		}
		if got := f.Calls(); len(got) != 1 || got[0] != "Join" {
			t.Fatalf("calls %v, want [Join]", got)
		}
	})
}

// TestSecurityStatusAndMetricsNeedCredential: Low finding "unauthenticated
// information" — /metrics and /cluster/v1/status (with raft addresses)
// needed no credential. An unauthenticated caller now gets a 401 naming
// what to send, and neither raft addresses nor metrics; the metrics token
// reads /metrics and nothing else; /readyz still answers probes.
func TestSecurityStatusAndMetricsNeedCredential(t *testing.T) {
	f := &fakeService{}
	s := securityServer(t, f, Config{MetricsToken: metricsToken}, apiToken)
	leaks := []string{"10.0.0.7", "raft_addr", "outpost_", "go_"}
	for _, tc := range []struct {
		name, path, token string
		status            int
	}{
		{"status, no token", "/cluster/v1/status", "", 401},
		{"status, edge token", "/cluster/v1/status", edgeToken, 403},
		{"status, metrics token", "/cluster/v1/status", metricsToken, 401},
		{"metrics, no token", "/metrics", "", 401},
		{"metrics, wrong token", "/metrics", "wrong-token-123", 401},
		{"metrics, edge token", "/metrics", edgeToken, 403},
		{"metrics, admin user", "/metrics", adminJWT, 403},
		{"consumer API, metrics token", "/api/v1/edges", metricsToken, 401},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := call(t, s, "GET", tc.path, tc.token, nil)
			if a.status != tc.status {
				t.Fatalf("%d %s, want %d", a.status, a.raw, tc.status)
			}
			for _, l := range leaks {
				if strings.Contains(string(a.raw), l) {
					t.Fatalf("refused answer leaks %q: %s", l, a.raw)
				}
			}
		})
	}
	if a := call(t, s, "GET", "/cluster/v1/status", apiToken, nil); a.status != 200 || !strings.Contains(string(a.raw), "10.0.0.7:7000") {
		t.Fatalf("status with the API token: %d %s", a.status, a.raw)
	}
	for _, tok := range []string{metricsToken, apiToken} {
		if a := call(t, s, "GET", "/metrics", tok, nil); a.status != 200 || !strings.Contains(string(a.raw), "outpost_http_requests_total") {
			t.Fatalf("metrics with a credential: %d %.200s", a.status, a.raw)
		}
	}
	if a := call(t, s, "GET", "/readyz", "", nil); a.status != 200 {
		t.Fatalf("readyz: %d %s", a.status, a.raw)
	}
}

// TestSecurityClusterCertificateOnHTTP: on a real TLS port, a member's
// certificate (offered with certs.ClusterALPN) is the cluster credential;
// a certificate from another CA, or none where the cluster protocol is
// offered, fails the handshake; a public client without one is an
// ordinary, unauthenticated caller.
func TestSecurityClusterCertificateOnHTTP(t *testing.T) {
	set, err := devcerts.Write(t.TempDir(), devcerts.Options{Names: []string{"n1", "n2"}})
	if err != nil {
		t.Fatal(err)
	}
	other, err := devcerts.Write(t.TempDir(), devcerts.Options{Names: []string{"n2"}})
	if err != nil {
		t.Fatal(err)
	}
	load := func(s *devcerts.Set, name string) *certs.Cluster {
		c, err := certs.LoadCluster(s.CA, s.Certs[name].Cert, s.Certs[name].Key)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	n1 := load(set, "n1")
	f := &fakeService{}
	s := securityServer(t, f, Config{ClusterTLS: true, PeerTLS: n1.ClientConfig()}, apiToken)
	tcfg, err := certs.HTTPServerConfig(nil, n1)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = s.App().Listener(tls.NewListener(ln, tcfg)) }()
	base := "https://" + ln.Addr().String()

	get := func(tc *tls.Config, method, path, body string) (int, string, error) {
		hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: tc}}
		defer hc.CloseIdleConnections()
		req, _ := http.NewRequest(method, base+path, strings.NewReader(body))
		resp, err := hc.Do(req)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), nil
	}
	member := load(set, "n2").ClientConfig()
	if code, body, err := get(member, "GET", "/cluster/v1/status", ""); err != nil || code != 200 || !strings.Contains(body, "raft_addr") {
		t.Fatalf("member status: %d %s %v", code, body, err)
	}
	if code, body, err := get(member, "POST", "/cluster/v1/join", deadJoin); err != nil || code != 200 {
		t.Fatalf("member join: %d %s %v", code, body, err)
	}
	if code, _, err := get(member, "GET", "/metrics", ""); err != nil || code != 200 {
		t.Fatalf("member metrics: %d %v", code, err)
	}
	calls := len(f.Calls())

	pool, err := certs.LoadPool(set.CA)
	if err != nil {
		t.Fatal(err)
	}
	public := &tls.Config{RootCAs: pool}
	if code, body, err := get(public, "POST", "/cluster/v1/join", deadJoin); err != nil || code != 401 {
		t.Fatalf("public client join: %d %s %v, want 401", code, body, err)
	}
	noCert := &tls.Config{RootCAs: pool, NextProtos: []string{certs.ClusterALPN}}
	if _, _, err := get(noCert, "POST", "/cluster/v1/join", deadJoin); err == nil {
		t.Fatal("cluster protocol without a certificate was served")
	}
	stranger := load(other, "n2").ClientConfig()
	stranger.RootCAs = pool // trusts the server; its own certificate is another CA's
	if _, _, err := get(stranger, "POST", "/cluster/v1/join", deadJoin); err == nil {
		t.Fatal("a certificate from another CA was accepted")
	}
	if got := f.Calls(); len(got) != calls {
		t.Fatalf("refused calls reached the service: %v", got[calls:])
	}
}
