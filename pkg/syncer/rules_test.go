package syncer

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
	"testing"

	"github.com/outpost-edge/outpost/pkg/cloud/client"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// cloudRules is a rule runner's SetCloud: it refuses a set that does not
// compile, as alerting.Runner does, and records the sets put in force.
type cloudRules struct {
	sets   [][]rules.Rule
	merged []rules.Alert
}

func (c *cloudRules) SetCloud(_ context.Context, rs []rules.Rule) error {
	if _, err := rules.CompileSet(rs); err != nil {
		return err
	}
	c.sets = append(c.sets, rs)
	return nil
}

func (c *cloudRules) MergeRemote(_ context.Context, a rules.Alert) (rules.Alert, error) {
	c.merged = append(c.merged, a)
	return a, nil
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
func (failing) MergeRemote(context.Context, rules.Alert) (rules.Alert, error) {
	return rules.Alert{}, errors.New("stopped")
}

// alertCloud takes alert pushes (or, with gone, answers 404 as an older
// cloud does) and records them.
func alertCloud(t *testing.T, gone bool, got chan<- wire.AlertBatch) *client.Client {
	t.Helper()
	return fakeCloud(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != wire.PathAlerts || gone {
			w.WriteHeader(http.StatusNotFound)
			_ = json.NewEncoder(w).Encode(wire.Envelope[any]{Code: 404, Message: "no route"})
			return
		}
		var b wire.AlertBatch
		if err := json.NewDecoder(r.Body).Decode(&b); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		got <- b
		answer(w, wire.AlertResult{Applied: len(b.Alerts)})
	})
}

// TestAlertsPushed: the alert outbox goes to the cloud and is emptied; a
// cloud that answers 404 (an older release) leaves it queued; a pulled
// KindAlert change is merged through the runner.
func TestAlertsPushed(t *testing.T) {
	st := openStore(t)
	a := rules.Alert{ID: rules.AlertID("hot", "d1", 5), Rule: "hot", Device: "d1", State: rules.StateActive, StartedAt: 5, Stamp: hlc.New(5, 0)}
	if err := st.SaveRuleEvents(0, []rules.Event{{Kind: rules.Fired, State: rules.State{Key: rules.Key{Rule: "hot", Device: "d1"}, Alert: &a}, Alert: &a}}); err != nil {
		t.Fatal(err)
	}
	got := make(chan wire.AlertBatch, 4)
	old, err := New(Config{EdgeID: "e1"}, Deps{Store: st, Client: alertCloud(t, true, got)})
	if err != nil {
		t.Fatal(err)
	}
	p := alertPusher{}
	old.pushAlerts(t.Context(), &p)
	if left, _ := st.PendingAlerts(10); len(left) != 1 || !p.refused {
		t.Fatalf("against an older cloud: %d left, refused %v", len(left), p.refused)
	}
	rr := &cloudRules{}
	s, err := New(Config{EdgeID: "e1"}, Deps{Store: st, Client: alertCloud(t, false, got), Rules: rr})
	if err != nil {
		t.Fatal(err)
	}
	s.pushAlerts(t.Context(), &alertPusher{})
	b := <-got
	var sent rules.Alert
	if len(b.Alerts) != 1 || json.Unmarshal(b.Alerts[0], &sent) != nil || sent != a || b.Edge != "e1" {
		t.Fatalf("pushed %+v (%s)", b, b.Alerts)
	}
	if left, _ := st.PendingAlerts(10); len(left) != 0 {
		t.Fatalf("alert outbox after the push: %+v", left)
	}
	ack := a
	ack.AckedBy, ack.AckStamp = "bob", hlc.New(9, 0)
	raw, _ := json.Marshal(ack)
	s.applyAlerts(t.Context(), []wire.Change{{Kind: wire.KindDesired, Device: "d1"}, {Kind: wire.KindAlert, Device: "d1", Alert: raw}})
	if len(rr.merged) != 1 || rr.merged[0] != ack {
		t.Fatalf("merged %+v", rr.merged)
	}
}
