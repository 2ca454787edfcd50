package api

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/daemontest"
	"github.com/outpost-edge/outpost/pkg/alerting"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/store"
)

// withRules runs a real rule runner over the env's store.
func withRules(t *testing.T) (envOpt, func() *alerting.Runner) {
	var r *alerting.Runner
	return func(_ *Config, d *Deps) {
		st := d.Store.(*store.Store)
		r = alerting.New(alerting.Config{Store: st, Stamp: hlc.NewClock(nil, 0).Now})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); _ = r.Run(ctx) }()
		t.Cleanup(func() { cancel(); <-done })
		d.Rules, d.Alerts = r, st
	}, func() *alerting.Runner { return r }
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	daemontest.Poll(t, 15*time.Second, what, cond)
}

// TestRulesAndAlertsAPI: an admin PUTs a rule (a bad one is 400 with the
// compiler's message), a committed reading raises an alert, the alert is
// listed for callers who may read its device and not for others, an
// operator of its region acks it, a viewer may not; GET /rules shows
// source and version; DELETE removes the rule.
func TestRulesAndAlertsAPI(t *testing.T) {
	opt, runner := withRules(t)
	e := newEnv(t, opt)
	admin := e.token("root")
	e.putUser("op-n", []string{"operator"}, []string{"north"})
	e.putUser("op-s", []string{"operator"}, []string{"south"})
	e.putUser("own", []string{"viewer"}, nil)
	e.seed("d1", 1)
	e.setMeta("d1", "north", "own")

	r := e.expect(req{method: http.MethodPut, path: "/api/v1/rules/hot", token: admin, body: map[string]any{"when": "temp >"}}, 400)
	if r.env.Message == "" {
		t.Fatal("no compiler message")
	}
	e.expect(req{method: http.MethodPut, path: "/api/v1/rules/hot", token: e.token("op-n"), body: map[string]any{"when": "temp > 30"}}, 403)
	e.expect(req{method: http.MethodPut, path: "/api/v1/rules/hot", token: admin, body: map[string]any{"name": "cold", "when": "temp > 30"}}, 400)
	e.expect(req{method: http.MethodPut, path: "/api/v1/rules/hot", token: admin, body: map[string]any{"when": "temp > 30", "severity": "critical"}}, 200)
	var list struct{ Items []alerting.RuleInfo }
	e.expect(req{method: http.MethodGet, path: "/api/v1/rules", token: admin}, 200).data(t, &list)
	if len(list.Items) != 1 || list.Items[0].Source != alerting.SourceLocal || list.Items[0].Version == "" || list.Items[0].Severity != "critical" {
		t.Fatalf("rules: %+v", list.Items)
	}

	if _, err := e.store.Ingest([]store.Item{{Device: "d1", ReceivedAt: t0, Readings: []store.Reading{
		{TS: t0 + 5000, Metrics: []store.Metric{{Name: "temp", Value: 35}}}}}}, nil); err != nil {
		t.Fatal(err)
	}
	runner().Notify()
	var page alertPage
	waitUntil(t, "the alert", func() bool {
		e.expect(req{method: http.MethodGet, path: "/api/v1/alerts?state=active", token: admin}, 200).data(t, &page)
		return len(page.Items) == 1
	})
	id := page.Items[0].ID
	for _, tc := range []struct {
		who  string
		sees int
	}{{"op-n", 1}, {"own", 1}, {"op-s", 0}, {"nobody", 0}} {
		var p alertPage
		e.expect(req{method: http.MethodGet, path: "/api/v1/alerts", token: e.token(tc.who)}, 200).data(t, &p)
		if len(p.Items) != tc.sees {
			t.Errorf("%s sees %d alerts, want %d", tc.who, len(p.Items), tc.sees)
		}
	}
	e.expect(req{method: http.MethodGet, path: "/api/v1/alerts?state=bogus", token: admin}, 400)
	e.expect(req{method: http.MethodPost, path: "/api/v1/alerts/" + id + "/ack", token: e.token("own")}, 403)
	e.expect(req{method: http.MethodPost, path: "/api/v1/alerts/" + id + "/ack", token: e.token("op-s")}, 403)
	e.expect(req{method: http.MethodPost, path: "/api/v1/alerts/not-an-id/ack", token: admin}, 400)
	e.expect(req{method: http.MethodPost, path: "/api/v1/alerts/d1~nope~1/ack", token: admin}, 404)
	var a rules.Alert
	e.expect(req{method: http.MethodPost, path: "/api/v1/alerts/" + id + "/ack", token: e.token("op-n")}, 200).data(t, &a)
	if a.State != rules.StateAcknowledged || a.AckedBy != "op-n" {
		t.Fatalf("acked: %+v", a)
	}
	e.expect(req{method: http.MethodGet, path: "/api/v1/alerts?state=acknowledged&device=d1", token: admin}, 200).data(t, &page)
	if len(page.Items) != 1 {
		t.Fatalf("acknowledged alerts of d1: %+v", page.Items)
	}

	e.expect(req{method: http.MethodDelete, path: "/api/v1/rules/hot", token: admin}, 200)
	e.expect(req{method: http.MethodDelete, path: "/api/v1/rules/hot", token: admin}, 404)
	e.expect(req{method: http.MethodGet, path: "/api/v1/rules", token: admin}, 200).data(t, &list)
	if len(list.Items) != 0 {
		t.Fatalf("rules after delete: %+v", list.Items)
	}
}

// TestAlertsPaging: next_cursor pages through the visible alerts only.
func TestAlertsPaging(t *testing.T) {
	opt, _ := withRules(t)
	e := newEnv(t, opt)
	var evs []rules.Event
	for i, dev := range []string{"a", "b", "c", "d", "e"} {
		e.seed(dev, 1)
		region := "north"
		if i%2 == 1 {
			region = "south"
		}
		e.setMeta(dev, region)
		a := &rules.Alert{ID: rules.AlertID("r", dev, 1), Rule: "r", Device: dev, State: rules.StateActive, StartedAt: 1}
		evs = append(evs, rules.Event{Kind: rules.Fired, State: rules.State{Key: rules.Key{Rule: "r", Device: dev}, Alert: a}, Alert: a})
	}
	if err := e.store.SaveRuleEvents(0, evs); err != nil {
		t.Fatal(err)
	}
	e.putUser("op", []string{"operator"}, []string{"north"})
	tok := e.token("op")
	var got []string
	cursor := ""
	for range 10 {
		var p alertPage
		e.expect(req{method: http.MethodGet, path: "/api/v1/alerts?limit=1&cursor=" + cursor, token: tok}, 200).data(t, &p)
		for _, a := range p.Items {
			got = append(got, a.Device)
		}
		if p.NextCursor == "" {
			break
		}
		cursor = p.NextCursor
	}
	if len(got) != 3 || got[0] != "a" || got[1] != "c" || got[2] != "e" {
		t.Fatalf("paged %v, want a c e (the north devices)", got)
	}
}
