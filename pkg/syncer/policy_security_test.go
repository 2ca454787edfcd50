package syncer

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/outpost-edge/outpost/pkg/policy"
	"github.com/outpost-edge/outpost/pkg/wire"
	"github.com/outpost-edge/outpost/policies"
)

const allowAll = "package outpost.authz\n\nimport rego.v1\n\ndefault allow := true\n\ndefault reason := \"allow-all\"\n"

// TestSecurityDeletedCloudPolicyReturnsToBuiltin: finding 12, deleting a
// policy at the cloud left edges enforcing it (an allow-all policy stayed
// in force). When the cloud's set no longer holds a module, the edge
// returns to the built-in policy: a viewer may not write desired state
// again.
func TestSecurityDeletedCloudPolicyReturnsToBuiltin(t *testing.T) {
	src, err := policies.Builtin()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	var builtin []policy.Module
	for name, rego := range src {
		builtin = append(builtin, policy.Module{Name: name, Source: rego})
		if err := os.WriteFile(filepath.Join(dir, name), []byte(rego), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	eng, err := policy.New(t.Context(), policy.Config{Dir: dir, CacheSize: -1})
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(Config{EdgeID: "e1"}, Deps{Store: openStore(t), Client: ackingCloud(t), Policies: eng, BuiltinPolicies: builtin})
	if err != nil {
		t.Fatal(err)
	}
	viewerWrites := func() bool {
		d, err := eng.Decide(context.Background(), policy.Input{User: policy.User{OpenID: "v", Roles: []string{"viewer"}},
			Action: "device.write_desired", Resource: policy.Resource{Kind: "device", ID: "d1"}})
		if err != nil {
			t.Fatal(err)
		}
		return d.Allow
	}
	if viewerWrites() {
		t.Fatal("the built-in policy lets a viewer write desired state")
	}
	if err := s.applySets(t.Context(), &wire.PullPage{Policies: []wire.Policy{{Name: "authz.rego", Rego: allowAll}}}); err != nil {
		t.Fatal(err)
	}
	if !viewerWrites() {
		t.Fatal("the cloud's allow-all policy was not installed")
	}
	// The cloud deleted its policy: the pull carries an empty set.
	if err := s.applySets(t.Context(), &wire.PullPage{}); err != nil {
		t.Fatal(err)
	}
	if viewerWrites() {
		t.Fatal("the deleted allow-all policy is still in force")
	}
	// A later page without policies changes nothing more.
	if err := s.applySets(t.Context(), &wire.PullPage{}); err != nil || viewerWrites() {
		t.Fatalf("second empty set: %v", err)
	}
}
