package service

import (
	"context"
	"errors"
	"strings"
	"testing"

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
