package e2e

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"
)

// Cloud policy and value limits: Rego that does not compile was accepted
// and distributed, and every edge then refused every later policy set. The
// cloud now answers such a PUT with 400 and the compiler's message,
// distributes nothing, and the edge keeps taking later good updates.
func TestSecurityBadRegoKeepsEdgesUpdating(t *testing.T) {
	c := startCloudCluster(t, 1)
	e := startSyncEdge(t, "e2", newSyncLink(t, c))
	_, file, _, _ := runtime.Caller(0)
	authz, err := os.ReadFile(filepath.Join(filepath.Dir(file), "..", "..", "policies", "authz.rego"))
	if err != nil {
		t.Fatal(err)
	}
	if code, env, err := c.api(c.Nodes[0], http.MethodPut, "/api/v1/policies/authz.rego", string(authz)); err != nil || code != 200 {
		t.Fatalf("put authz.rego: %d %s %v", code, env.Message, err)
	}
	code, env, err := c.api(c.Nodes[0], http.MethodPut, "/api/v1/policies/broken.rego", "package outpost.broken\n\nallow if {\n")
	if err != nil || code != 400 || !strings.Contains(env.Message, "rego_parse_error") || !strings.Contains(env.Message, "broken.rego") {
		t.Fatalf("put a module that does not compile: %d %q %v; want 400 with the compiler's message", code, env.Message, err)
	}
	_, env, _ = c.api(c.Nodes[0], http.MethodGet, "/api/v1/policies", nil)
	if strings.Contains(string(env.Data), "broken.rego") {
		t.Fatalf("the refused module is distributed: %s", env.Data)
	}
	marker := "package outpost.cloudmarker\n\nversion := \"after-a-refused-put\"\n"
	if code, env, err := c.api(c.Nodes[0], http.MethodPut, "/api/v1/policies/marker.rego", marker); err != nil || code != 200 {
		t.Fatalf("put marker.rego: %d %s %v", code, env.Message, err)
	}
	path := filepath.Join(e.dataDir, "policies-active", "marker.rego")
	cloudWaitFor(t, 20*time.Second, "the edge installs the later good policy", func() bool {
		got, err := os.ReadFile(path)
		return err == nil && string(got) == marker && strings.Contains(e.log.String(), "policy reloaded")
	})
	if _, err := os.Stat(filepath.Join(e.dataDir, "policies-active", "broken.rego")); err == nil {
		t.Fatal("the refused module reached the edge")
	}
	if strings.Contains(e.log.String(), "do not compile") {
		t.Fatalf("the edge refused a distributed set:\n%s", edgeTail(e.log.String(), 40))
	}
}

// Sessions: access tokens survived refresh-reuse revocation for up to 15
// minutes. Now a reused refresh token ends the session's access tokens at
// the cloud and at the edge the reuse went through at once, at another edge
// once it has pulled the revocation, and a local session's at its edge at
// once as well.
func TestSecuritySessionRevokedEverywhere(t *testing.T) {
	wx, _ := fakeWeChat(t)
	c := startCloudCluster(t, 1, cloudWithArgs("-wechat-appid", "wx-test", "-wechat-secret", "s3cret", "-wechat-api-base", wx.URL))
	a := startSyncEdge(t, "e2", newSyncLink(t, c))
	b := startSyncEdge(t, "e3", newSyncLink(t, c))

	call := func(e *edgeProc, path string, body any) (int, string, syncPair) {
		t.Helper()
		var p syncPair
		code, env, err := e.rawCall(http.MethodPost, path, "", body)
		if err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		if code == 200 {
			_ = json.Unmarshal(env.Data, &p)
		}
		return code, env.Message, p
	}
	get := func(e *edgeProc, tok string) int {
		t.Helper()
		code, _, err := e.rawCall(http.MethodGet, "/api/v1/edge", tok, nil)
		if err != nil {
			t.Fatal(err)
		}
		return code
	}
	atCloud := func(tok string) int {
		t.Helper()
		code, _, err := c.apiTok(c.Nodes[0], http.MethodGet, "/api/v1/devices/x", nil, tok)
		if err != nil {
			t.Fatal(err)
		}
		return code
	}
	const reused = "refresh token was already used: the session is revoked, log in again"

	// A cloud session, through edge A.
	var p0 syncPair
	cloudWaitFor(t, 20*time.Second, "login through edge A", func() bool {
		code, _, p := call(a, "/api/v1/auth/login", map[string]string{"code": "c-phone"})
		p0 = p
		return code == 200 && p.RefreshToken != ""
	})
	code, msg, p1 := call(a, "/api/v1/auth/refresh", map[string]string{"refresh_token": p0.RefreshToken})
	if code != 200 {
		t.Fatalf("refresh: %d %s", code, msg)
	}
	if get(a, p1.AccessToken) != 200 {
		t.Fatal("edge A refuses a live session")
	}
	cloudWaitFor(t, 20*time.Second, "edge B accepts the session (it trusts the deployment key)", func() bool {
		return get(b, p1.AccessToken) == 200
	})
	if code := atCloud(p1.AccessToken); code == 401 {
		t.Fatal("the cloud refuses a live session")
	}
	// A retry of that refresh (its answer lost) within the reuse grace
	// gets the identical pair, from the cloud, and revokes nothing.
	if code, msg, again := call(a, "/api/v1/auth/refresh", map[string]string{"refresh_token": p0.RefreshToken}); code != 200 || again != p1 {
		t.Fatalf("retried refresh: %d %q, same pair %v", code, msg, again == p1)
	}
	code, msg, p2 := call(a, "/api/v1/auth/refresh", map[string]string{"refresh_token": p1.RefreshToken})
	if code != 200 {
		t.Fatalf("second refresh: %d %s", code, msg)
	}
	// The copied first refresh token comes back after its successor was
	// used: a reuse, not a retry.
	if code, msg, _ := call(a, "/api/v1/auth/refresh", map[string]string{"refresh_token": p0.RefreshToken}); code != 401 || msg != reused {
		t.Fatalf("reused refresh token: %d %q", code, msg)
	}
	// No waiting: edge A and the cloud refuse the session's access tokens
	// from the next request on.
	for name, tok := range map[string]string{"first": p0.AccessToken, "rotated": p1.AccessToken, "newest": p2.AccessToken} {
		if code := get(a, tok); code != 401 {
			t.Errorf("edge A right after the reuse, %s access token: %d, want 401", name, code)
		}
		if code := atCloud(tok); code != 401 {
			t.Errorf("the cloud right after the reuse, %s access token: %d, want 401", name, code)
		}
	}
	cloudWaitFor(t, 20*time.Second, "edge B refuses the session after its pull", func() bool {
		return get(b, p1.AccessToken) == 401
	})

	// A local session at edge A (dev login: signed with A's own key).
	code, msg, l0 := call(a, "/api/v1/auth/login", map[string]string{"code": "dev:o-local"})
	if code != 200 {
		t.Fatalf("dev login: %d %s", code, msg)
	}
	code, msg, l1 := call(a, "/api/v1/auth/refresh", map[string]string{"refresh_token": l0.RefreshToken})
	if code != 200 || get(a, l1.AccessToken) != 200 {
		t.Fatalf("local refresh: %d %s", code, msg)
	}
	if code, msg, again := call(a, "/api/v1/auth/refresh", map[string]string{"refresh_token": l0.RefreshToken}); code != 200 || again != l1 {
		t.Fatalf("retried local refresh: %d %q, same pair %v", code, msg, again == l1)
	}
	if code, msg, _ = call(a, "/api/v1/auth/refresh", map[string]string{"refresh_token": l1.RefreshToken}); code != 200 {
		t.Fatalf("second local refresh: %d %s", code, msg)
	}
	if code, msg, _ := call(a, "/api/v1/auth/refresh", map[string]string{"refresh_token": l0.RefreshToken}); code != 401 || msg != reused {
		t.Fatalf("reused local refresh token: %d %q", code, msg)
	}
	if code := get(a, l1.AccessToken); code != 401 {
		t.Fatalf("local session's access token right after the reuse: %d, want 401", code)
	}
	fresh := a.login()
	if get(a, fresh) != 200 {
		t.Fatal("a new session is refused")
	}
}
