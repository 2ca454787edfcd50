package service

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/outpost-edge/outpost/pkg/policy"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Cloud policy and value limits: Rego that does not compile was accepted
// and distributed, and every edge then refused every later policy set (each
// still held the broken module). PutPolicy now compiles the set as it would
// be distributed and refuses a module that breaks it with the compiler's
// message; nothing is proposed, and a later good module is accepted and
// loads at an edge.
func TestSecurityBadRegoRefusedAtPut(t *testing.T) {
	n := startService(t, Config{})
	ctx := context.Background()
	authz, err := os.ReadFile(filepath.Join("..", "..", "..", "policies", "authz.rego"))
	if err != nil {
		t.Fatal(err)
	}
	if err := n.svc.PutPolicy(ctx, wire.Policy{Name: "authz.rego", Rego: string(authz)}); err != nil {
		t.Fatalf("the built-in policy: %v", err)
	}
	for _, tc := range []struct{ name, rego, want string }{
		{"syntax", "package outpost.extra\n\nallow if {\n", "rego_parse_error"},
		{"undefined function", "package outpost.extra\n\nv := no_such_function(1)\n", "rego_type_error"},
		{"conflicts with another module", "package outpost.authz\n\ndefault allow := true\n", "rego_type_error"},
		{"not Rego v1", "package outpost.extra\n\nallow { true }\n", "rego_parse_error"},
	} {
		err := n.svc.PutPolicy(ctx, wire.Policy{Name: "extra.rego", Rego: tc.rego})
		if !errors.Is(err, wire.ErrInvalid) || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "extra.rego") {
			t.Errorf("%s: PutPolicy = %v, want ErrInvalid with the compiler's %s naming extra.rego", tc.name, err, tc.want)
		}
	}
	ps, err := n.svc.Policies(ctx)
	if err != nil || len(ps) != 1 || ps[0].Name != "authz.rego" {
		t.Fatalf("policies after refused puts: %+v, %v; want only authz.rego", ps, err)
	}

	// A later good update is accepted, and an edge installs the set.
	marker := "package outpost.marker\n\nversion := \"2\"\n"
	if err := n.svc.PutPolicy(ctx, wire.Policy{Name: "marker.rego", Rego: marker}); err != nil {
		t.Fatalf("good module after refused ones: %v", err)
	}
	ps, err = n.svc.Policies(ctx)
	if err != nil || len(ps) != 2 {
		t.Fatalf("policies: %+v, %v", ps, err)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "authz.rego"), authz, 0o644); err != nil {
		t.Fatal(err)
	}
	engine, err := policy.New(ctx, policy.Config{Dir: dir, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	modules := make([]policy.Module, len(ps))
	for i, p := range ps {
		modules[i] = policy.Module{Name: p.Name, Source: p.Rego}
	}
	if err := engine.Install(ctx, modules); err != nil {
		t.Fatalf("an edge installing the distributed set: %v", err)
	}
}

// Edge directory: the advertise URL was not validated, so javascript: was
// served to phones. A heartbeat advertising anything but an http(s) URL is
// refused and leaves the directory as it was.
func TestSecurityHeartbeatAdvertiseRefused(t *testing.T) {
	n := startService(t, Config{})
	ctx := context.Background()
	for _, bad := range []string{"javascript:alert(document.cookie)", "data:text/html,<script>x</script>", "https://user:pw@edge.example", "//edge.example"} {
		if _, err := n.svc.Heartbeat(ctx, "e1", &wire.Heartbeat{Edge: "e1", Advertise: bad}); !errors.Is(err, wire.ErrInvalid) {
			t.Errorf("heartbeat advertising %q: %v, want ErrInvalid", bad, err)
		}
	}
	if edges, err := n.svc.Edges(ctx); err != nil || len(edges) != 0 {
		t.Fatalf("directory after refused heartbeats: %+v, %v", edges, err)
	}
	if _, err := n.svc.Heartbeat(ctx, "e1", &wire.Heartbeat{Edge: "e1", Advertise: "https://edge-1.example.com"}); err != nil {
		t.Fatal(err)
	}
	if edges, err := n.svc.Edges(ctx); err != nil || len(edges) != 1 || edges[0].Advertise != "https://edge-1.example.com" {
		t.Fatalf("directory: %+v, %v", edges, err)
	}
}
