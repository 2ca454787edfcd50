package syncer

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"testing"

	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// cloudRules is a rule runner's SetCloud: it refuses a set that does not
// compile, as alerting.Runner does, and records the sets put in force.
type cloudRules struct{ sets [][]rules.Rule }

func (c *cloudRules) SetCloud(_ context.Context, rs []rules.Rule) error {
	if _, err := rules.CompileSet(rs); err != nil {
		return err
	}
	c.sets = append(c.sets, rs)
	return nil
}

func ruleNames(rs []rules.Rule) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.Name)
	}
	return out
}

// TestRulesFromPulls: a versioned page whose rules version moved puts the
// set in force and caches it (CachedRules, what the edge starts with); a
// page at the same version leaves it; a set that does not compile is
// refused whole: the last good set stays in force and cached, and the
// version is recorded so it is not retried; an empty set at version ""
// empties the cloud's rules; an unversioned page (an older cloud) carries
// none and changes nothing.
func TestRulesFromPulls(t *testing.T) {
	st := openStore(t)
	rr := &cloudRules{}
	s, err := New(Config{EdgeID: "e1"}, Deps{Store: st, Client: ackingCloud(t), Rules: rr})
	if err != nil {
		t.Fatal(err)
	}
	raw := func(rs ...rules.Rule) []json.RawMessage {
		var out []json.RawMessage
		for _, r := range rs {
			b, _ := json.Marshal(r)
			out = append(out, b)
		}
		return out
	}
	hot := rules.Rule{Name: "hot", When: "temp > 30"}
	cold := rules.Rule{Name: "cold", When: "temp < 0"}
	bad := rules.Rule{Name: "bad", When: "temp >"}
	cached := func() []string {
		t.Helper()
		rs, err := CachedRules(st)
		if err != nil {
			t.Fatal(err)
		}
		return ruleNames(rs)
	}
	steps := []struct {
		name       string
		page       wire.PullPage
		wantSets   int
		wantCached []string
		wantHave   string
	}{
		{"first set", wire.PullPage{Versions: &wire.SetVersions{Rules: "v1"}, Rules: raw(hot, cold)}, 1, []string{"hot", "cold"}, "v1"},
		{"same version", wire.PullPage{Versions: &wire.SetVersions{Rules: "v1"}}, 1, []string{"hot", "cold"}, "v1"},
		{"does not compile", wire.PullPage{Versions: &wire.SetVersions{Rules: "v2"}, Rules: raw(hot, bad)}, 1, []string{"hot", "cold"}, "v2"},
		{"older cloud", wire.PullPage{Edges: []wire.Edge{}}, 1, []string{"hot", "cold"}, "v2"},
		{"emptied", wire.PullPage{Versions: &wire.SetVersions{}}, 2, nil, ""},
	}
	for _, st := range steps {
		if err := s.applySets(t.Context(), &st.page); err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		if len(rr.sets) != st.wantSets {
			t.Fatalf("%s: %d sets put in force, want %d", st.name, len(rr.sets), st.wantSets)
		}
		if got := cached(); !slices.Equal(got, st.wantCached) {
			t.Fatalf("%s: cached %v, want %v", st.name, got, st.wantCached)
		}
		if s.have.Rules != st.wantHave {
			t.Fatalf("%s: have %q, want %q", st.name, s.have.Rules, st.wantHave)
		}
	}
	if got := ruleNames(rr.sets[0]); !slices.Equal(got, []string{"hot", "cold"}) {
		t.Fatalf("first set put in force: %v", got)
	}
	// A runner that fails for another reason (stopped) fails the page:
	// the version is not recorded, so the next pull brings the set again.
	s.deps.Rules = failing{}
	if err := s.applySets(t.Context(), &wire.PullPage{Versions: &wire.SetVersions{Rules: "v3"}, Rules: raw(hot)}); err == nil || s.have.Rules == "v3" {
		t.Fatalf("a failing runner: err %v, have %q", err, s.have.Rules)
	}
}

type failing struct{}

func (failing) SetCloud(context.Context, []rules.Rule) error { return errors.New("stopped") }
