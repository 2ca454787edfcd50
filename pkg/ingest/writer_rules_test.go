package ingest

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/store"
)

func (h *hookStore) SaveRuleEvents(seq uint64, evs []rules.Event) error {
	h.ownSaves.Add(1)
	return h.Store.SaveRuleEvents(seq, evs)
}

func firedEvent(dev string) rules.Event {
	a := &rules.Alert{ID: rules.AlertID("hot", dev, 1), Rule: "hot", Device: dev, State: rules.StateActive,
		StartedAt: 1, Stamp: hlc.New(1, 0)}
	return rules.Event{Kind: rules.Fired, State: rules.State{Key: rules.Key{Rule: "hot", Device: dev}, Version: "v", Alert: a}, Alert: a}
}

// saveAsync runs w.SaveRuleEvents on its own goroutine.
func saveAsync(w *Writer, seq uint64, evs []rules.Event) <-chan error {
	errc := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		errc <- w.SaveRuleEvents(ctx, seq, evs)
	}()
	return errc
}

func waitSaved(t *testing.T, errc <-chan error) {
	t.Helper()
	select {
	case err := <-errc:
		if err != nil {
			t.Fatalf("SaveRuleEvents: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("SaveRuleEvents did not return within 10s")
	}
}

func checkSaved(t *testing.T, st interface {
	RuleStates() (uint64, []rules.State, error)
	Alert(string) (rules.Alert, error)
}, seq uint64, dev string) {
	t.Helper()
	got, states, err := st.RuleStates()
	if err != nil || got != seq || len(states) != 1 || states[0].Device != dev {
		t.Fatalf("RuleStates: position %d (want %d), states %+v, %v", got, seq, states, err)
	}
	if _, err := st.Alert(rules.AlertID("hot", dev, 1)); err != nil {
		t.Fatalf("the saved alert: %v", err)
	}
}

// TestWriterRuleSaveRidesCommit: a rule save queued while messages are
// queued is written in their commit (no transaction of its own), and
// returns only once that commit is durable.
func TestWriterRuleSaveRidesCommit(t *testing.T) {
	hs := newHookStore(t)
	rec := newDoneRec()
	entered, release := make(chan struct{}), make(chan struct{})
	first := true
	hs.before = func() error {
		if first { // only the writer's goroutine calls Ingest
			first = false
			close(entered)
			<-release
		}
		return nil
	}
	w := NewWriter(hs, NewDecoder(DefaultLimits), Config{}, nil, discardLogger())
	startWriter(t, w)
	submit(t, w, rec.msg("0", "sensors/dev/telemetry", telemetry(0)))
	<-entered // the first commit is in progress: what follows queues behind it
	for i := 1; i <= 3; i++ {
		submit(t, w, rec.msg(fmt.Sprint(i), "sensors/dev/telemetry", telemetry(i)))
	}
	errc := saveAsync(w, 1, []rules.Event{firedEvent("dev")})
	waitFor(t, "the save queued", func() bool { return len(w.saves) == 1 })
	select {
	case err := <-errc:
		t.Fatalf("SaveRuleEvents returned (%v) before any commit carried it", err)
	default:
	}
	close(release)
	waitSaved(t, errc)
	rec.wait(t, 4)
	if c, m := hs.calls.Load(), hs.mixed.Load(); c != 2 || m != 1 {
		t.Fatalf("%d commits, %d with messages and the save; want 2 and 1", c, m)
	}
	if n := hs.ownSaves.Load(); n != 0 {
		t.Fatalf("%d saves took their own transaction", n)
	}
	checkSaved(t, hs, 1, "dev")
}

// TestWriterLoneRuleSave: a save with no message queued commits at once,
// on its own, even with a long Linger; after the writer stopped, a save
// is the store's own transaction and still lands.
func TestWriterLoneRuleSave(t *testing.T) {
	hs := newHookStore(t)
	w := NewWriter(hs, NewDecoder(DefaultLimits), Config{Linger: time.Hour}, nil, discardLogger())
	stop := startWriter(t, w)
	waitSaved(t, saveAsync(w, 0, []rules.Event{firedEvent("a")}))
	if c := hs.calls.Load(); c != 1 {
		t.Fatalf("%d commits for a lone save, want 1", c)
	}
	checkSaved(t, hs, 0, "a")
	if err := stop(); err != nil {
		t.Fatal(err)
	}
	waitSaved(t, saveAsync(w, 0, []rules.Event{{Kind: rules.Cleared, State: rules.State{Key: rules.Key{Rule: "hot", Device: "a"}}}, firedEvent("b")}))
	if n := hs.ownSaves.Load(); n != 1 {
		t.Fatalf("%d saves in the store's own transaction after stop, want 1", n)
	}
	checkSaved(t, hs, 0, "b")
}

// TestWriterRuleSaveOverQuota: over quota, messages wait but saves (which
// release outbox entries) still commit: one the writer holds when it finds
// the store over quota, and one that comes while it waits.
func TestWriterRuleSaveOverQuota(t *testing.T) {
	hs := newHookStore(t)
	hs.usage.Store(1 << 30)
	rec := newDoneRec()
	w := NewWriter(hs, NewDecoder(DefaultLimits), Config{QuotaBytes: 1 << 20}, nil, discardLogger())
	startWriter(t, w)
	waitSaved(t, saveAsync(w, 0, []rules.Event{firedEvent("x")}))
	checkSaved(t, hs, 0, "x")
	submit(t, w, rec.msg("a", "sensors/dev/telemetry", telemetry(1)))
	waitFor(t, "backpressure", w.Backpressure)
	waitSaved(t, saveAsync(w, 0, []rules.Event{{Kind: rules.Cleared, State: rules.State{Key: rules.Key{Rule: "hot", Device: "x"}}}, firedEvent("y")}))
	checkSaved(t, hs, 0, "y")
	if rec.count() != 0 {
		t.Fatal("a message was acknowledged over quota")
	}
}

// TestWriterRuleSaveTrimsHeldOutbox: a save that releases more held outbox
// entries than one commit deletes keeps saving, through the writer, until
// they are all gone.
func TestWriterRuleSaveTrimsHeldOutbox(t *testing.T) {
	st, err := store.Open(filepath.Join(t.TempDir(), "edge.db"), store.Options{HoldOutboxForRules: true, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	hs := &hookStore{Store: st}
	hs.usage.Store(-1)
	const n = 25000 // more than two trim chunks
	// A batch writes one readings entry per device: 25 batches of 1,000
	// devices.
	for b := 0; b < n/1000; b++ {
		items := make([]store.Item, 1000)
		for i := range items {
			items[i] = store.Item{Device: fmt.Sprintf("d%d", i), ReceivedAt: 1,
				Readings: []store.Reading{{TS: int64(b*1000 + i + 1), Metrics: []store.Metric{{Name: "t", Value: 1}}}}}
		}
		if _, err := st.Ingest(items, nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := st.AckOutbox(n); err != nil {
		t.Fatal(err)
	}
	w := NewWriter(hs, NewDecoder(DefaultLimits), Config{}, nil, discardLogger())
	startWriter(t, w)
	waitSaved(t, saveAsync(w, n, nil))
	if left, err := st.Outbox(0, 10, 1<<20); err != nil || len(left) != 0 {
		t.Fatalf("%d entries left after the runner and the cloud passed them all (%v)", len(left), err)
	}
	if c, own := hs.calls.Load(), hs.ownSaves.Load(); c != 3 || own != 0 {
		t.Fatalf("%d commits and %d own saves, want 3 commits (a chunk each) and none", c, own)
	}
}

// BenchmarkWriterRuleSaves is BenchmarkWriter's load with a stand-in for
// the rule runner that, woken after every commit, saves an event and its
// position at the head: through the writer (its commits carry the saves,
// as at the edge) or in the store's own transaction (as before). The
// store fsyncs, as at the edge: a save of its own is a commit of its own,
// which holds bbolt's writer lock through its fsync.
func BenchmarkWriterRuleSaves(b *testing.B) {
	for _, via := range []string{"writer", "store"} {
		b.Run(via, func(b *testing.B) { benchWriter(b, time.Millisecond, &benchRunner{viaWriter: via == "writer"}) })
	}
}

type benchRunner struct {
	viaWriter bool
	wake      chan struct{}
}

func (r *benchRunner) notify() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

func (r *benchRunner) start(b *testing.B, st *store.Store, w *Writer) (stop func()) {
	r.wake = make(chan struct{}, 1)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for n := 0; ; n++ {
			select {
			case <-ctx.Done():
				return
			case <-r.wake:
			}
			seq := st.Counts().OutboxHead
			evs := []rules.Event{firedEvent(fmt.Sprintf("dev-%d", n%100))}
			var err error
			if r.viaWriter {
				err = w.SaveRuleEvents(ctx, seq, evs)
			} else {
				err = st.SaveRuleEvents(seq, evs)
			}
			if err != nil && ctx.Err() == nil {
				b.Error(err)
			}
		}
	}()
	return func() { cancel(); <-done }
}
