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

// Policies written in the cloud reach every edge's policy directory (and
// the engine reloads them); roles granted at the cloud reach every edge,
// while a role granted at an edge is refused by the cloud and undone at
// that edge; policies and roles survive an edge restart with the cloud
// unreachable.
func TestSyncPoliciesAndRolesDistribution(t *testing.T) {
	c := startCloudCluster(t, 1)
	linkA, linkB := newSyncLink(t, c), newSyncLink(t, c)
	a := startSyncEdge(t, "e2", linkA)
	b := startSyncEdge(t, "e3", linkB)

	// The cloud distributes the built-in policy plus one module of its own.
	_, file, _, _ := runtime.Caller(0)
	authz, err := os.ReadFile(filepath.Join(filepath.Dir(file), "..", "..", "policies", "authz.rego"))
	if err != nil {
		t.Fatal(err)
	}
	extra := "package outpost.cloudmarker\n\nimport rego.v1\n\nversion := \"from-cloud-1\"\n"
	for name, body := range map[string]string{"authz.rego": string(authz), "marker.rego": extra} {
		if code, env, err := c.api(c.Nodes[0], http.MethodPut, "/api/v1/policies/"+name, body); err != nil || code != 200 {
			t.Fatalf("put policy %s: %d %s %v", name, code, env.Message, err)
		}
	}
	marker := filepath.Join(b.dataDir, "policies-active", "marker.rego")
	cloudWaitFor(t, 20*time.Second, "edge B installs the cloud's policies", func() bool {
		got, err := os.ReadFile(marker)
		return err == nil && string(got) == extra
	})
	cloudWaitFor(t, 20*time.Second, "edge B's engine reloads them", func() bool {
		return strings.Contains(b.log.String(), "policy reloaded")
	})

	// A role granted at the cloud reaches both edges.
	if code, env, err := c.api(c.Nodes[0], http.MethodPut, "/api/v1/users/o-roamer", map[string]any{"roles": []string{"admin"}}); err != nil || code != 200 {
		t.Fatalf("grant at the cloud: %d %s %v", code, env.Message, err)
	}
	// o-roamer (dev login at B, B's own key) may write users at B only once
	// B has the role from the cloud.
	var roamer syncPair
	if code, env, err := b.rawCall(http.MethodPost, "/api/v1/auth/login", "", map[string]string{"code": "dev:o-roamer"}); err != nil || code != 200 {
		t.Fatalf("dev login at B: %d %s %v", code, env.Message, err)
	} else if err := json.Unmarshal(env.Data, &roamer); err != nil {
		t.Fatal(err)
	}
	cloudWaitFor(t, 20*time.Second, "edge B applies the role granted at the cloud", func() bool {
		code, _, err := b.rawCall(http.MethodPut, "/api/v1/users/o-other", roamer.AccessToken, map[string]any{"roles": []string{"viewer"}})
		return err == nil && code == 200
	})

	// A role granted at an edge (by that edge's admin) is refused by the
	// cloud (finding 2: roles are granted at the cloud only), never reaches
	// the other edge, and edge A's copy returns to the cloud's record.
	admin := a.login()
	if err := a.api(http.MethodPut, "/api/v1/users/o-mallory", admin, map[string]any{"roles": []string{"admin"}}, nil); err != nil {
		t.Fatal(err)
	}
	cloudWaitFor(t, 20*time.Second, "the cloud refuses and counts the edge-granted role", func() bool {
		v, ok := c.labelled(c.Nodes[0], `outpost_cloud_changes_refused_total{edge="e2",reason="user_change"}`)
		return ok && v >= 1
	})
	if code, env, err := c.api(c.Nodes[0], http.MethodGet, "/api/v1/users/o-mallory", nil); err == nil && code == 200 && strings.Contains(string(env.Data), `"admin"`) {
		t.Fatalf("the cloud holds the edge-granted role: %s", env.Data)
	}
	for _, e := range []*edgeProc{a, b} {
		var mallory syncPair
		if err := e.api(http.MethodPost, "/api/v1/auth/login", "", map[string]string{"code": "dev:o-mallory"}, &mallory); err != nil {
			t.Fatal(err)
		}
		cloudWaitFor(t, 20*time.Second, "o-mallory holds no admin role at "+e.dataDir, func() bool {
			code, _, err := e.rawCall(http.MethodPut, "/api/v1/users/o-x", mallory.AccessToken, map[string]any{"roles": []string{"viewer"}})
			return err == nil && code == 403
		})
	}

	// Restart edge B with the cloud unreachable: the cached policies stay.
	linkB.cut(true)
	b.kill9()
	b.start()
	if got, err := os.ReadFile(marker); err != nil || string(got) != extra {
		t.Fatalf("after an offline restart the cloud's policy is gone: %v", err)
	}
	if code, _, _ := b.rawCall(http.MethodGet, "/api/v1/edge", b.login(), nil); code != 200 {
		t.Fatalf("edge B offline after restart: GET /api/v1/edge %d", code)
	}
}
