package service

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// TestRulesDistributed: over real raft, a rule that does not compile is
// refused with the compiler's message and nothing is stored; a good one is
// stored with its region and version; a bad region is refused; delete
// removes it, and a second delete is ErrNotFound.
func TestRulesDistributed(t *testing.T) {
	n := startService(t, Config{})
	ctx := context.Background()
	if _, err := n.svc.PutRule(ctx, rules.Rule{Name: "hot", When: "temp >"}, ""); !errors.Is(err, wire.ErrInvalid) || !strings.Contains(err.Error(), "when:") {
		t.Fatalf("a rule that does not compile: %v", err)
	}
	if _, err := n.svc.PutRule(ctx, rules.Rule{Name: "hot", When: "temp > 1"}, "no/pe"); !errors.Is(err, wire.ErrInvalid) {
		t.Fatalf("a bad region: %v", err)
	}
	if rs, err := n.svc.Rules(ctx); err != nil || len(rs) != 0 {
		t.Fatalf("rules after refusals: %+v %v", rs, err)
	}
	put, err := n.svc.PutRule(ctx, rules.Rule{Name: "hot", When: "temp > 30", For: rules.Duration(30e9)}, "north")
	if err != nil || put.Version == "" || put.Severity != rules.SeverityWarning {
		t.Fatalf("PutRule: %+v %v", put, err)
	}
	rs, err := n.svc.Rules(ctx)
	if err != nil || len(rs) != 1 || rs[0].Region != "north" || rs[0].Version != put.Version || rs[0].When != "temp > 30" {
		t.Fatalf("Rules: %+v %v", rs, err)
	}
	if err := n.svc.DeleteRule(ctx, "hot"); err != nil {
		t.Fatal(err)
	}
	if err := n.svc.DeleteRule(ctx, "hot"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("a second delete: %v", err)
	}
}

// TestRulesInPulls: a versioned pull carries the rules of the edge's region
// and of every region, only while the edge's version differs; edges of
// different regions get different sets and versions; a rule PUT wakes a
// held pull; an edge that does not version its sets gets none.
func TestRulesInPulls(t *testing.T) {
	n := startService(t, Config{})
	ctx := context.Background()
	for edge, region := range map[string]string{"en": "north", "es": "south"} {
		if _, err := n.svc.Heartbeat(ctx, edge, &wire.Heartbeat{Edge: edge, Region: region}); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range []struct{ name, region string }{{"all", ""}, {"n", "north"}, {"s", "south"}} {
		if _, err := n.svc.PutRule(ctx, rules.Rule{Name: r.name, When: "temp > 1"}, r.region); err != nil {
			t.Fatal(err)
		}
	}
	names := func(p wire.PullPage) []string {
		var out []string
		for _, raw := range p.Rules {
			var r rules.Rule
			if err := json.Unmarshal(raw, &r); err != nil {
				t.Fatal(err)
			}
			out = append(out, r.Name)
		}
		return out
	}
	pn, err := n.svc.Pull(ctx, "en", PullRequest{Limit: 100, Have: &wire.SetVersions{}})
	if err != nil {
		t.Fatal(err)
	}
	ps, err := n.svc.Pull(ctx, "es", PullRequest{Limit: 100, Have: &wire.SetVersions{}})
	if err != nil {
		t.Fatal(err)
	}
	if got := names(pn); !slices.Equal(got, []string{"all", "n"}) {
		t.Fatalf("north's rules: %v", got)
	}
	if got := names(ps); !slices.Equal(got, []string{"all", "s"}) {
		t.Fatalf("south's rules: %v", got)
	}
	if pn.Versions.Rules == "" || pn.Versions.Rules == ps.Versions.Rules {
		t.Fatalf("versions: north %q south %q", pn.Versions.Rules, ps.Versions.Rules)
	}
	// The same version again: no rules in the page.
	again, err := n.svc.Pull(ctx, "en", PullRequest{Cursor: pn.NextCursor, Limit: 100, Have: pn.Versions})
	if err != nil || again.Rules != nil || again.Versions.Rules != pn.Versions.Rules {
		t.Fatalf("pull at the same version: %+v %v", again, err)
	}
	if legacy, err := n.svc.Pull(ctx, "en", PullRequest{Limit: 100}); err != nil || legacy.Rules != nil {
		t.Fatalf("an unversioned pull: %v %v", legacy.Rules, err)
	}
	// A rule for every region wakes a held pull of the north edge.
	held := make(chan wire.PullPage, 1)
	go func() {
		p, err := n.svc.Pull(ctx, "en", PullRequest{Cursor: pn.NextCursor, Limit: 100, Have: pn.Versions, Wait: 20 * time.Second})
		if err != nil {
			t.Error(err)
		}
		held <- p
	}()
	if _, err := n.svc.PutRule(ctx, rules.Rule{Name: "all2", When: "temp > 2"}, ""); err != nil {
		t.Fatal(err)
	}
	select {
	case p := <-held:
		if got := names(p); !slices.Equal(got, []string{"all", "all2", "n"}) || p.Versions.Rules == pn.Versions.Rules {
			t.Fatalf("woken pull: %v %+v", got, p.Versions)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("a rule PUT did not wake the held pull")
	}
	// Deleting every rule of the edge's set moves its version to "".
	for _, name := range []string{"all", "all2", "n"} {
		if err := n.svc.DeleteRule(ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	empty, err := n.svc.Pull(ctx, "en", PullRequest{Limit: 100, Have: pn.Versions})
	if err != nil || empty.Rules != nil || empty.Versions.Rules != "" {
		t.Fatalf("after deletes: %v %+v %v", empty.Rules, empty.Versions, err)
	}
}
