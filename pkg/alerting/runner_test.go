package alerting

import (
	"context"
	"encoding/json"
	"errors"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/daemontest"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/store"
)

// published records what the runner published (the broker is exercised by
// the edge's end-to-end tests).
type published struct {
	mu   sync.Mutex
	msgs map[string][][]byte
}

func (p *published) Publish(topic string, payload []byte, _ bool, _ byte) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.msgs == nil {
		p.msgs = map[string][][]byte{}
	}
	p.msgs[topic] = append(p.msgs[topic], payload)
	return nil
}

func (p *published) on(topic string) [][]byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([][]byte(nil), p.msgs[topic]...)
}

type fixture struct {
	t    *testing.T
	path string
	st   *store.Store
	now  atomic.Int64 // Unix ms
	pub  *published
	r    *Runner
	stop func()
	// saver, when set, is the runner's Saver.
	saver Saver
}

func newFixture(t *testing.T) *fixture {
	f := &fixture{t: t, path: filepath.Join(t.TempDir(), "edge.db"), pub: &published{}}
	f.now.Store(1_000_000)
	f.open()
	return f
}

func (f *fixture) open() {
	st, err := store.Open(f.path, store.Options{HoldOutboxForRules: true})
	if err != nil {
		f.t.Fatal(err)
	}
	f.st = st
	f.t.Cleanup(func() { st.Close() })
}

func (f *fixture) clock() time.Time { return time.UnixMilli(f.now.Load()) }

// start runs a runner with set in force.
func (f *fixture) start(set rules.Set) {
	f.t.Helper()
	clk := hlc.NewClock(f.clock, 0)
	f.r = New(Config{Store: f.st, Saver: f.saver, Downlink: f.pub, Now: f.clock, Stamp: clk.Now})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.r.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				f.t.Errorf("Run: %v", err)
			}
		})
	}
	f.stop = stop
	f.t.Cleanup(stop)
	if set != nil {
		if err := f.r.Swap(ctx, set); err != nil {
			f.t.Fatal(err)
		}
	}
}

func (f *fixture) halt() { f.stop() }

func (f *fixture) ingest(dev string, temp float64) {
	f.t.Helper()
	ts := f.now.Add(1)
	if _, err := f.st.Ingest([]store.Item{{Device: dev, ReceivedAt: ts, Readings: []store.Reading{
		{TS: ts, Metrics: []store.Metric{{Name: "temp", Value: temp}}}}}}, nil); err != nil {
		f.t.Fatal(err)
	}
	if f.r != nil {
		f.r.Notify()
	}
}

func (f *fixture) alerts(q store.AlertsQuery) []rules.Alert {
	q.Limit = 100
	as, err := f.st.Alerts(q)
	if err != nil {
		f.t.Fatal(err)
	}
	return as
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	daemontest.Poll(t, 15*time.Second, what, cond)
}

func set(t *testing.T, rs ...rules.Rule) rules.Set {
	t.Helper()
	s, err := rules.CompileSet(rs)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestFireActClear: a committed reading over the threshold raises one
// alert, stored and published on alerts/{device}; its set_desired action
// writes the device's desired state as the rule and publishes the
// downlink; a reading under the clear condition clears it.
func TestFireActClear(t *testing.T) {
	f := newFixture(t)
	f.start(set(t, rules.Rule{Name: "hot", When: "temp > 30", Clear: "temp < 28", Message: "too hot",
		Actions: []rules.Action{{SetDesired: map[string]json.RawMessage{"fan": []byte(`"on"`)}}}}))
	f.ingest("d1", 25)
	f.ingest("d1", 31)
	f.ingest("d1", 33) // still one alert
	waitFor(t, "an active alert", func() bool { return len(f.alerts(store.AlertsQuery{State: rules.StateActive})) == 1 })
	a := f.alerts(store.AlertsQuery{})[0]
	if a.Rule != "hot" || a.Device != "d1" || a.Value != 31 || a.Message != "too hot" {
		t.Fatalf("alert %+v", a)
	}
	waitFor(t, "the alert published", func() bool { return len(f.pub.on("alerts/d1")) == 1 })
	d, err := f.st.Device("d1")
	if err != nil || string(d.Desired.State()["fan"]) != `"on"` {
		t.Fatalf("desired after the action: %v %v", d, err)
	}
	if got := f.pub.on("devices/d1/desired"); len(got) != 1 {
		t.Fatalf("desired downlinks %d, want 1", len(got))
	}
	ch, _ := f.st.Outbox(0, 100, 1<<20)
	var by string
	for _, c := range ch {
		if c.Kind == store.ChangeDesired {
			by = c.By.OpenID
		}
	}
	if by != "rule:hot" {
		t.Fatalf("the desired change's actor is %q, want rule:hot", by)
	}
	f.ingest("d1", 29) // not clear yet
	f.ingest("d1", 27)
	waitFor(t, "the alert cleared", func() bool { return len(f.alerts(store.AlertsQuery{State: rules.StateCleared})) == 1 })
	if n := len(f.alerts(store.AlertsQuery{})); n != 1 {
		t.Fatalf("%d alerts, want 1", n)
	}
}

// TestCatchUpFromStore: readings committed while the runner was stopped
// (or while it was behind), and already acknowledged by the cloud, are
// still evaluated: the store holds them for the runner.
func TestCatchUpFromStore(t *testing.T) {
	f := newFixture(t)
	for i := range 50 {
		f.ingest("d2", float64(i)) // 31..49 over the threshold
	}
	if err := f.st.AckOutbox(f.st.Counts().OutboxHead); err != nil {
		t.Fatal(err)
	}
	// The rules in force when the runner starts are the stored ones.
	if err := f.st.PutLocalRule(rules.Rule{Name: "hot", When: "temp > 30", Clear: "temp < 28"}); err != nil {
		t.Fatal(err)
	}
	f.start(nil)
	waitFor(t, "the alert from the backlog", func() bool { return len(f.alerts(store.AlertsQuery{})) == 1 })
	waitFor(t, "the runner at the head", func() bool {
		seq, _, _ := f.st.RuleStates()
		return seq == f.st.Counts().OutboxHead
	})
	if left, _ := f.st.Outbox(0, 100, 1<<20); len(left) != 0 {
		t.Fatalf("%d outbox entries left after the cloud and the runner passed them", len(left))
	}
}

// TestRestartMidFor: a rule pending when the edge stops fires after the
// restart once its for has elapsed, with no new reading.
func TestRestartMidFor(t *testing.T) {
	f := newFixture(t)
	rule := rules.Rule{Name: "warm", When: "temp > -5", For: rules.Duration(10 * time.Minute)}
	if err := f.st.PutLocalRule(rule); err != nil {
		t.Fatal(err)
	}
	f.start(nil)
	f.ingest("freezer", -2)
	waitFor(t, "the pending state saved", func() bool {
		_, states, _ := f.st.RuleStates()
		return len(states) == 1
	})
	f.halt()
	f.st.Close()
	f.open()
	f.now.Add(int64(11 * time.Minute / time.Millisecond))
	f.start(nil)
	f.r.Notify()
	waitFor(t, "the alert after the restart", func() bool { return len(f.alerts(store.AlertsQuery{})) == 1 })
	if a := f.alerts(store.AlertsQuery{})[0]; a.Value != -2 {
		t.Fatalf("alert %+v", a)
	}
}

// TestAck: an open alert acked through the runner is acknowledged, stays
// open, and clears later; an ack of an unknown alert is ErrNotFound.
func TestAck(t *testing.T) {
	f := newFixture(t)
	f.start(set(t, rules.Rule{Name: "hot", When: "temp > 30"}))
	f.ingest("d3", 31)
	waitFor(t, "an alert", func() bool { return len(f.alerts(store.AlertsQuery{})) == 1 })
	id := f.alerts(store.AlertsQuery{})[0].ID
	a, err := f.r.Ack(context.Background(), id, "alice")
	if err != nil || a.State != rules.StateAcknowledged || a.AckedBy != "alice" {
		t.Fatalf("Ack: %+v %v", a, err)
	}
	if got := f.alerts(store.AlertsQuery{State: rules.StateAcknowledged}); len(got) != 1 {
		t.Fatalf("acknowledged alerts: %+v", got)
	}
	f.ingest("d3", 20)
	waitFor(t, "the acked alert cleared", func() bool { return len(f.alerts(store.AlertsQuery{State: rules.StateCleared})) == 1 })
	if a := f.alerts(store.AlertsQuery{})[0]; a.AckedBy != "alice" {
		t.Fatalf("the clear lost the ack: %+v", a)
	}
	if _, err := f.r.Ack(context.Background(), "d3~nope~1", "alice"); err != ErrNotFound {
		t.Fatalf("Ack of a missing alert: %v", err)
	}
}

// TestLocalRules: PutLocal refuses a rule that does not compile and keeps
// the set; a stored rule is in force after a restart; DeleteLocal removes
// it; a cloud rule shadows a local one of the same name and a local PUT of
// that name is refused.
func TestLocalRules(t *testing.T) {
	f := newFixture(t)
	f.start(nil)
	ctx := context.Background()
	if _, err := f.r.PutLocal(ctx, rules.Rule{Name: "bad", When: "temp >"}); !errors.Is(err, rules.ErrInvalid) {
		t.Fatalf("PutLocal of a bad rule: %v", err)
	}
	info, err := f.r.PutLocal(ctx, rules.Rule{Name: "hot", When: "temp > 30"})
	if err != nil || info.Source != SourceLocal || info.Version == "" {
		t.Fatalf("PutLocal: %+v %v", info, err)
	}
	f.halt()
	f.start(nil)
	list, err := f.r.List(ctx)
	if err != nil || len(list) != 1 || list[0].Name != "hot" || list[0].Source != SourceLocal {
		t.Fatalf("after a restart: %+v %v", list, err)
	}
	if err := f.r.SetCloud(ctx, []rules.Rule{{Name: "hot", When: "temp > 40"}, {Name: "cold", When: "temp < 0"}}); err != nil {
		t.Fatal(err)
	}
	if err := f.r.SetCloud(ctx, []rules.Rule{{Name: "broken", When: "("}}); !errors.Is(err, rules.ErrInvalid) {
		t.Fatalf("a bad cloud set: %v", err)
	}
	list, _ = f.r.List(ctx)
	if len(list) != 2 || list[1].Name != "hot" || list[1].Source != SourceCloud || list[1].When != "temp > 40" {
		t.Fatalf("with the cloud set: %+v", list)
	}
	if _, err := f.r.PutLocal(ctx, rules.Rule{Name: "hot", When: "temp > 1"}); !errors.Is(err, ErrConflict) {
		t.Fatalf("PutLocal over a cloud rule: %v", err)
	}
	if err := f.r.DeleteLocal(ctx, "nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("DeleteLocal of a missing rule: %v", err)
	}
	f.ingest("d", 45)
	waitFor(t, "the cloud rule's alert", func() bool { return len(f.alerts(store.AlertsQuery{})) == 1 })
}

// TestMergeRemote: an ack made at the cloud, merged into an open alert,
// acknowledges it at the edge (stored, published once, queued for the
// cloud); merging it again changes and publishes nothing; the clear that
// follows keeps the cloud's acker; a copy merged into a cleared alert goes
// to the store; an unknown alert is ErrNotFound.
func TestMergeRemote(t *testing.T) {
	f := newFixture(t)
	f.start(set(t, rules.Rule{Name: "hot", When: "temp > 30"}))
	f.ingest("d4", 31)
	waitFor(t, "an alert", func() bool { return len(f.alerts(store.AlertsQuery{})) == 1 })
	id := f.alerts(store.AlertsQuery{})[0].ID
	ack := rules.Alert{ID: id, Rule: "hot", Device: "d4", AckedAt: 5, AckedBy: "bob", AckStamp: hlc.New(5, 1)}
	a, err := f.r.MergeRemote(context.Background(), ack)
	if err != nil || a.State != rules.StateAcknowledged || a.AckedBy != "bob" {
		t.Fatalf("MergeRemote: %+v %v", a, err)
	}
	n := len(f.pub.on(AlertTopic("d4")))
	if _, err := f.r.MergeRemote(context.Background(), ack); err != nil {
		t.Fatal(err)
	}
	if got := len(f.pub.on(AlertTopic("d4"))); got != n {
		t.Fatalf("a merge that changed nothing was published: %d messages, had %d", got, n)
	}
	if p, err := f.st.PendingAlerts(10); err != nil || len(p) != 1 || p[0].AckedBy != "bob" {
		t.Fatalf("alert outbox after the merge: %+v %v", p, err)
	}
	f.ingest("d4", 20)
	waitFor(t, "the alert cleared", func() bool { return len(f.alerts(store.AlertsQuery{State: rules.StateCleared})) == 1 })
	// A later ack from elsewhere, after the clear: stored, state stays cleared.
	late := ack
	late.AckedBy, late.AckStamp = "carol", hlc.New(f.now.Load()+10, 0)
	if a, err := f.r.MergeRemote(context.Background(), late); err != nil || a.State != rules.StateCleared || a.AckedBy != "carol" {
		t.Fatalf("a merge into a cleared alert: %+v %v", a, err)
	}
	if _, err := f.r.MergeRemote(context.Background(), rules.Alert{ID: "d4~nope~1", Rule: "nope", Device: "d4"}); err != ErrNotFound {
		t.Fatalf("MergeRemote of a missing alert: %v", err)
	}
}

// gateSaver holds every save until it is let through.
type gateSaver struct {
	st      *store.Store
	entered chan struct{}
	gate    chan struct{}
}

func (g *gateSaver) SaveRuleEvents(_ context.Context, seq uint64, evs []rules.Event) error {
	if len(evs) > 0 {
		g.entered <- struct{}{}
		<-g.gate
	}
	return g.st.SaveRuleEvents(seq, evs)
}

// TestPublishAfterSave: the runner saves through its Saver (the edge's is
// the ingest writer), and publishes an alert only once its save returned.
func TestPublishAfterSave(t *testing.T) {
	f := newFixture(t)
	g := &gateSaver{st: f.st, entered: make(chan struct{}, 1), gate: make(chan struct{})}
	f.saver = g
	f.start(nil)
	if err := f.r.Swap(context.Background(), set(t, rules.Rule{Name: "hot", When: "temp > 30"})); err != nil {
		t.Fatal(err)
	}
	f.ingest("d1", 31)
	select {
	case <-g.entered:
	case <-time.After(15 * time.Second):
		t.Fatal("the runner never saved through its Saver")
	}
	if got := f.pub.on("alerts/d1"); len(got) != 0 {
		t.Fatalf("%d alerts published before their save returned", len(got))
	}
	if n := len(f.alerts(store.AlertsQuery{})); n != 0 {
		t.Fatalf("%d alerts stored before the Saver saved them", n)
	}
	close(g.gate)
	waitFor(t, "the alert published", func() bool { return len(f.pub.on("alerts/d1")) == 1 })
}

// TestSetMetrics: the map rules see holds exactly the reading's metrics,
// whatever the reading before it held.
func TestSetMetrics(t *testing.T) {
	m := func(kv ...any) []store.Metric {
		var out []store.Metric
		for i := 0; i < len(kv); i += 2 {
			out = append(out, store.Metric{Name: kv[i].(string), Value: kv[i+1].(float64)})
		}
		return out
	}
	r := New(Config{})
	for i, ms := range [][]store.Metric{
		m("temp", 1.0, "hum", 2.0),
		m("temp", 3.0, "hum", 4.0), // same names: overwritten in place
		m("temp", 5.0),             // fewer
		m("hum", 6.0),              // as many, another name
		m("hum", 7.0, "co2", 8.0, "temp", 9.0),
		m(),
	} {
		r.setMetrics(ms)
		want := map[string]float64{}
		for _, x := range ms {
			want[x.Name] = x.Value
		}
		if len(r.metrics) != len(want) {
			t.Fatalf("reading %d: metrics %v, want %v", i, r.metrics, want)
		}
		for k, v := range want {
			if got, ok := r.metrics[k]; !ok || got != v {
				t.Fatalf("reading %d: metrics %v, want %v", i, r.metrics, want)
			}
		}
	}
}
