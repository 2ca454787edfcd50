package ingest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/internal/daemontest"
	"github.com/outpost-edge/outpost/pkg/store"
)

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func openStore(t *testing.T) *store.Store {
	t.Helper()
	s, err := store.Open(filepath.Join(t.TempDir(), "edge.db"), store.Options{MaxDeadLetters: 100})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// hookStore wraps a store so that tests can block, fail or observe commits
// and control the reported usage.
type hookStore struct {
	*store.Store
	before  func() error // called at the start of Ingest
	after   func()       // called after the real Ingest returned
	calls   atomic.Int64
	usage   atomic.Int64 // reported by Usage when >= 0
	failAll atomic.Bool
	// poison makes Ingest fail whenever the batch holds this device.
	poison string
	// mixed counts the commits that carried both messages and rule saves;
	// ownSaves the rule saves made in the store's own transaction.
	mixed, ownSaves atomic.Int64
}

func newHookStore(t *testing.T) *hookStore {
	h := &hookStore{Store: openStore(t)}
	h.usage.Store(-1)
	return h
}

func (h *hookStore) Ingest(items []store.Item, dead []store.DeadLetter, saves ...store.RuleSave) ([]store.ItemResult, error) {
	h.calls.Add(1)
	if len(saves) > 0 && len(items)+len(dead) > 0 {
		h.mixed.Add(1)
	}
	if h.before != nil {
		if err := h.before(); err != nil {
			return nil, err
		}
	}
	if h.failAll.Load() {
		return nil, errors.New("disk on fire")
	}
	for _, it := range items {
		if h.poison != "" && it.Device == h.poison {
			return nil, errors.New("record too strange to store")
		}
	}
	res, err := h.Store.Ingest(items, dead, saves...)
	if h.after != nil {
		h.after()
	}
	return res, err
}

func (h *hookStore) Usage() (int64, error) {
	if u := h.usage.Load(); u >= 0 {
		return u, nil
	}
	return h.Store.Usage()
}

// startWriter runs w until the test ends and returns a stop function that
// cancels it and waits for Run to return.
func startWriter(t *testing.T, w *Writer) (stop func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- w.Run(ctx) }()
	var once sync.Once
	var runErr error
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case runErr = <-errc:
			case <-time.After(10 * time.Second):
				runErr = errors.New("writer did not stop within 10s")
			}
		})
		return runErr
	}
	t.Cleanup(func() { stop() })
	return stop
}

// doneRec records Done calls.
type doneRec struct {
	mu    sync.Mutex
	calls map[string][]error
	ch    chan string
}

func newDoneRec() *doneRec {
	return &doneRec{calls: map[string][]error{}, ch: make(chan string, 10000)}
}

func (d *doneRec) msg(name, topic, payload string) *Message {
	return &Message{Topic: topic, Payload: []byte(payload), Received: time.Now(), Done: func(err error) {
		d.mu.Lock()
		d.calls[name] = append(d.calls[name], err)
		d.mu.Unlock()
		d.ch <- name
	}}
}

func (d *doneRec) count() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.calls)
}

// wait waits for n Done calls.
func (d *doneRec) wait(t *testing.T, n int) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for i := 0; i < n; i++ {
		select {
		case <-d.ch:
		case <-deadline:
			t.Fatalf("only %d of %d messages done after 10s", i, n)
		}
	}
}

func (d *doneRec) check(t *testing.T, name string, wantErr bool) {
	t.Helper()
	d.mu.Lock()
	defer d.mu.Unlock()
	errs := d.calls[name]
	if len(errs) != 1 {
		t.Fatalf("%s: Done called %d times, want once", name, len(errs))
	}
	if (errs[0] != nil) != wantErr {
		t.Fatalf("%s: Done(%v), want error %v", name, errs[0], wantErr)
	}
}

func submit(t *testing.T, w *Writer, m *Message) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := w.Submit(ctx, m); err != nil {
		t.Fatalf("Submit: %v", err)
	}
}

func telemetry(i int) string {
	return fmt.Sprintf(`{"id": "m%d", "metrics": {"t": %d}}`, i, i)
}

func TestWriterAcksOnlyAfterCommit(t *testing.T) {
	for _, unsafe := range []bool{false, true} {
		t.Run(fmt.Sprintf("unsafe=%v", unsafe), func(t *testing.T) {
			hs := newHookStore(t)
			rec := newDoneRec()
			entered, release := make(chan struct{}), make(chan struct{})
			var once sync.Once
			hs.before = func() error {
				once.Do(func() { close(entered); <-release })
				return nil
			}
			w := NewWriter(hs, NewDecoder(DefaultLimits), Config{UnsafeAckBeforeCommit: unsafe}, prometheus.NewRegistry(), discardLogger())
			startWriter(t, w)
			const n = 5
			for i := 0; i < n; i++ {
				submit(t, w, rec.msg(fmt.Sprint(i), "sensors/dev/telemetry", telemetry(i)))
			}
			select {
			case <-entered:
			case <-time.After(10 * time.Second):
				t.Fatal("writer never committed")
			}
			if got := rec.count(); got != 0 && !unsafe {
				t.Fatalf("%d messages done while their commit is blocked", got)
			} else if unsafe && got == 0 {
				t.Fatal("the unsafe mode should ack before the commit; the test cannot detect loss")
			}
			close(release)
			rec.wait(t, n)
			if unsafe {
				return
			}
			for i := 0; i < n; i++ {
				rec.check(t, fmt.Sprint(i), false)
			}
			if c := hs.Counts(); c.Readings != n {
				t.Fatalf("%d readings stored, want %d", c.Readings, n)
			}
		})
	}
}

// TestWriterDoneMeansReadable checks from inside Done that the message is in
// the store, for many concurrent submitters, and that batches group.
func TestWriterDoneMeansReadable(t *testing.T) {
	hs := newHookStore(t)
	w := NewWriter(hs, NewDecoder(DefaultLimits), Config{MaxBatch: 64, Linger: 2 * time.Millisecond}, nil, discardLogger())
	startWriter(t, w)
	const clients, per = 8, 50
	var wg sync.WaitGroup
	var bad atomic.Int64
	var done atomic.Int64
	for c := 0; c < clients; c++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dev := fmt.Sprintf("dev%d", c)
			for i := 0; i < per; i++ {
				id := fmt.Sprintf("m%d", i)
				ch := make(chan error, 1)
				m := &Message{Topic: "sensors/" + dev + "/telemetry", Payload: []byte(telemetry(i)), Done: func(err error) {
					if err == nil {
						p, qerr := hs.Readings(dev, store.ReadingsQuery{Limit: per})
						found := false
						for _, r := range p.Items {
							found = found || r.ID == id
						}
						if qerr != nil || !found {
							bad.Add(1)
						}
					}
					ch <- err
				}}
				if err := w.Submit(context.Background(), m); err != nil {
					bad.Add(1)
					return
				}
				if i%10 == 9 { // pipeline a few, then wait
					if err := <-ch; err != nil {
						bad.Add(1)
					}
				} else {
					go func() { <-ch; done.Add(1) }()
				}
			}
		}()
	}
	wg.Wait()
	if bad.Load() != 0 {
		t.Fatalf("%d messages were done before they were readable, or failed", bad.Load())
	}
	deadline := time.Now().Add(10 * time.Second)
	for hs.Counts().Readings != clients*per && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if got := hs.Counts().Readings; got != clients*per {
		t.Fatalf("%d readings, want %d", got, clients*per)
	}
	if calls := hs.calls.Load(); calls >= clients*per {
		t.Fatalf("%d commits for %d messages: no group commit", calls, clients*per)
	}
}

func TestWriterDeadLetters(t *testing.T) {
	hs := newHookStore(t)
	rec := newDoneRec()
	w := NewWriter(hs, NewDecoder(DefaultLimits), Config{}, nil, discardLogger())
	startWriter(t, w)
	msgs := []struct{ name, topic, payload, reason string }{
		{"good", "sensors/dev/telemetry", telemetry(1), ""},
		{"nan", "sensors/dev/telemetry", `{"metrics":{"t":NaN}}`, "payload is not valid JSON"},
		{"topic", "sensors/a b/telemetry", telemetry(2), "must match [A-Za-z0-9._-]{1,64}"},
		{"garbage", "sensors/dev/telemetry", "\x00\xff not json", "payload is not valid JSON"},
		{"state", "sensors/dev/state", `{"state":{"fw":"1.0"}}`, ""},
		{"bad state", "sensors/dev/state", `{"state":{"fw":NaN}}`, "payload is not valid JSON"},
	}
	for _, m := range msgs {
		submit(t, w, rec.msg(m.name, m.topic, m.payload))
	}
	rec.wait(t, len(msgs))
	for _, m := range msgs {
		rec.check(t, m.name, false) // dead letters are acked too
	}
	dls, err := hs.DeadLetters(0, 100)
	if err != nil {
		t.Fatal(err)
	}
	var reasons []string
	for _, m := range msgs {
		if m.reason != "" {
			reasons = append(reasons, m.reason)
		}
	}
	if len(dls) != len(reasons) {
		t.Fatalf("%d dead letters, want %d: %+v", len(dls), len(reasons), dls)
	}
	for i, dl := range dls {
		if !strings.Contains(dl.Reason, reasons[i]) || dl.Topic != msgs[map[int]int{0: 1, 1: 2, 2: 3, 3: 5}[i]].topic || len(dl.Payload) == 0 || dl.At == 0 {
			t.Fatalf("dead letter %d = %+v, want reason %q", i, dl, reasons[i])
		}
	}
	if c := hs.Counts(); c.Readings != 1 || c.DeadLetters != uint64(len(reasons)) {
		t.Fatalf("counts %+v", c)
	}
	d, err := hs.Device("dev")
	if err != nil || string(d.Reported["fw"].Value) != `"1.0"` {
		t.Fatalf("device = %+v, %v", d, err)
	}
}

func TestWriterCommitFailure(t *testing.T) {
	hs := newHookStore(t)
	hs.failAll.Store(true)
	rec := newDoneRec()
	w := NewWriter(hs, NewDecoder(DefaultLimits), Config{}, nil, discardLogger())
	startWriter(t, w)
	submit(t, w, rec.msg("a", "sensors/dev/telemetry", telemetry(1)))
	submit(t, w, rec.msg("dead", "sensors/dev/telemetry", `nope`))
	rec.wait(t, 2)
	rec.check(t, "a", true)
	rec.check(t, "dead", true) // its dead letter was not stored either
	if c := hs.Counts(); c.Readings != 0 || c.DeadLetters != 0 {
		t.Fatalf("counts after a failed commit: %+v", c)
	}
	// The writer keeps going once the store recovers; redelivery stores.
	hs.failAll.Store(false)
	submit(t, w, rec.msg("b", "sensors/dev/telemetry", telemetry(1)))
	rec.wait(t, 1)
	rec.check(t, "b", false)
	if c := hs.Counts(); c.Readings != 1 {
		t.Fatalf("counts after recovery: %+v", c)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	daemontest.Poll(t, 10*time.Second, what, cond)
}

func TestWriterQuotaBackpressure(t *testing.T) {
	t.Run("real usage over a small quota", func(t *testing.T) {
		hs := newHookStore(t)
		rec := newDoneRec()
		w := NewWriter(hs, NewDecoder(DefaultLimits), Config{QuotaBytes: 4096}, nil, discardLogger())
		stop := startWriter(t, w)
		submit(t, w, rec.msg("a", "sensors/dev/telemetry", telemetry(1)))
		waitFor(t, "backpressure", w.Backpressure)
		if rec.count() != 0 || hs.calls.Load() != 0 {
			t.Fatalf("over quota, yet %d done and %d commits", rec.count(), hs.calls.Load())
		}
		// Shutting down while over quota fails the held message: it was
		// not stored and must be redelivered.
		if err := stop(); err != nil {
			t.Fatal(err)
		}
		rec.wait(t, 1)
		rec.check(t, "a", true)
		if c := hs.Counts(); c.Readings != 0 {
			t.Fatalf("stored while over quota: %+v", c)
		}
	})
	t.Run("resumes when usage drops", func(t *testing.T) {
		hs := newHookStore(t)
		hs.usage.Store(1 << 30)
		rec := newDoneRec()
		w := NewWriter(hs, NewDecoder(DefaultLimits), Config{QuotaBytes: 1 << 20}, nil, discardLogger())
		startWriter(t, w)
		for i := 0; i < 3; i++ {
			submit(t, w, rec.msg(fmt.Sprint(i), "sensors/dev/telemetry", telemetry(i)))
		}
		waitFor(t, "backpressure", w.Backpressure)
		if rec.count() != 0 {
			t.Fatalf("%d messages done while over quota", rec.count())
		}
		hs.usage.Store(1000)
		rec.wait(t, 3)
		for i := 0; i < 3; i++ {
			rec.check(t, fmt.Sprint(i), false)
		}
		if w.Backpressure() {
			t.Fatal("still reporting backpressure under quota")
		}
		// Over quota again: checked on every batch while it lasts, and at
		// least every QuotaCheck otherwise.
		hs.usage.Store(1 << 30)
		submit(t, w, rec.msg("late", "sensors/dev/telemetry", telemetry(9)))
		hs.usage.Store(1000)
		rec.wait(t, 1)
		rec.check(t, "late", false)
	})
	t.Run("free space", func(t *testing.T) {
		hs := newHookStore(t)
		var free atomic.Int64
		rec := newDoneRec()
		w := NewWriter(hs, NewDecoder(DefaultLimits), Config{MinFreeBytes: 1 << 20, FreeBytes: func() (int64, error) { return free.Load(), nil }}, nil, discardLogger())
		startWriter(t, w)
		submit(t, w, rec.msg("a", "sensors/dev/telemetry", telemetry(1)))
		waitFor(t, "backpressure", w.Backpressure)
		free.Store(1 << 30)
		rec.wait(t, 1)
		rec.check(t, "a", false)
	})
}

func TestWriterShutdownDrains(t *testing.T) {
	hs := newHookStore(t)
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	hs.before = func() error {
		once.Do(func() { close(entered); <-release })
		return nil
	}
	rec := newDoneRec()
	w := NewWriter(hs, NewDecoder(DefaultLimits), Config{MaxBatch: 4, QueueSize: 100}, nil, discardLogger())
	stop := startWriter(t, w)
	submit(t, w, rec.msg("first", "sensors/dev/telemetry", telemetry(0)))
	<-entered
	const n = 30 // queued behind the blocked commit, several batches' worth
	for i := 1; i <= n; i++ {
		submit(t, w, rec.msg(fmt.Sprint(i), "sensors/dev/telemetry", telemetry(i)))
	}
	stopped := make(chan error, 1)
	go func() { stopped <- stop() }()
	close(release)
	if err := <-stopped; err != nil {
		t.Fatalf("Run: %v", err)
	}
	// Every queued message was committed and done before Run returned.
	if got := rec.count(); got != n+1 {
		t.Fatalf("%d messages done after shutdown, want %d", got, n+1)
	}
	rec.check(t, "first", false)
	for i := 1; i <= n; i++ {
		rec.check(t, fmt.Sprint(i), false)
	}
	if c := hs.Counts(); c.Readings != n+1 {
		t.Fatalf("%d readings stored, want %d", c.Readings, n+1)
	}
	if err := w.Submit(context.Background(), rec.msg("x", "sensors/dev/telemetry", telemetry(1))); !errors.Is(err, ErrStopped) {
		t.Fatalf("Submit after Run returned: %v, want ErrStopped", err)
	}
}

func TestWriterSubmitContextWhenFull(t *testing.T) {
	hs := newHookStore(t)
	w := NewWriter(hs, NewDecoder(DefaultLimits), Config{MaxBatch: 1, QueueSize: 1}, nil, discardLogger())
	// Not running: the queue fills after one message.
	rec := newDoneRec()
	submit(t, w, rec.msg("a", "sensors/dev/telemetry", telemetry(1)))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := w.Submit(ctx, rec.msg("b", "sensors/dev/telemetry", telemetry(2))); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Submit on a full queue: %v", err)
	}
	startWriter(t, w)
	rec.wait(t, 1)
	rec.check(t, "a", false)
	if rec.count() != 1 {
		t.Fatal("Done called for a message Submit refused")
	}
}

// TestWriterPoisonMessageIsolated: a message the store refuses must not fail
// its batch-mates on every redelivery; it is dead-lettered alone and the
// others are stored.
func TestWriterPoisonMessageIsolated(t *testing.T) {
	hs := newHookStore(t)
	hs.poison = "bad"
	hs.before = nil
	rec := newDoneRec()
	w := NewWriter(hs, NewDecoder(DefaultLimits), Config{Linger: 50 * time.Millisecond}, nil, discardLogger())
	startWriter(t, w)
	submit(t, w, rec.msg("good1", "sensors/dev/telemetry", telemetry(1)))
	submit(t, w, rec.msg("poison", "sensors/bad/telemetry", telemetry(2)))
	submit(t, w, rec.msg("good2", "sensors/dev/telemetry", telemetry(3)))
	rec.wait(t, 3)
	for _, name := range []string{"good1", "poison", "good2"} {
		rec.check(t, name, false) // all acknowledged: two stored, one dead-lettered
	}
	if c := hs.Counts(); c.Readings != 2 || c.DeadLetters != 1 {
		t.Fatalf("counts %+v, want 2 readings and 1 dead letter", c)
	}
	dls, err := hs.DeadLetters(0, 10)
	if err != nil || len(dls) != 1 || dls[0].Topic != "sensors/bad/telemetry" || !strings.Contains(dls[0].Reason, "record too strange") {
		t.Fatalf("dead letters %+v, %v", dls, err)
	}
}

// TestWriterRefusesReadingsOlderThanRetention: a reading the next retention
// pass would delete is not stored and acknowledged as if kept: it is a dead
// letter naming why, acknowledged (it can never be stored), and counted.
// A message with one such reading among fresh ones is refused whole, as
// every other invalid reading refuses its message.
func TestWriterRefusesReadingsOlderThanRetention(t *testing.T) {
	hs := newHookStore(t)
	rec := newDoneRec()
	reg := prometheus.NewRegistry()
	limits := DefaultLimits
	limits.MaxAge = time.Hour
	w := NewWriter(hs, NewDecoder(limits), Config{}, reg, discardLogger())
	startWriter(t, w)
	now := time.Now()
	old, fresh := now.Add(-2*time.Hour).UnixMilli(), now.Add(-30*time.Minute).UnixMilli()
	msgs := []struct{ name, payload string }{
		{"fresh", fmt.Sprintf(`{"ts":%d,"metrics":{"t":1}}`, fresh)},
		{"old", fmt.Sprintf(`{"ts":%d,"metrics":{"t":2}}`, old)},
		{"old in an array", fmt.Sprintf(`[{"ts":%d,"metrics":{"t":3}},{"ts":%d,"metrics":{"t":4}}]`, fresh+1, old)},
		{"no ts is receive time", `{"metrics":{"t":5}}`},
	}
	for _, m := range msgs {
		msg := rec.msg(m.name, "sensors/dev/telemetry", m.payload)
		msg.Received = now
		submit(t, w, msg)
	}
	rec.wait(t, len(msgs))
	for _, m := range msgs {
		rec.check(t, m.name, false)
	}
	dls, err := hs.DeadLetters(0, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(dls) != 2 {
		t.Fatalf("%d dead letters, want 2: %+v", len(dls), dls)
	}
	for _, dl := range dls {
		if !strings.Contains(dl.Reason, "older than the edge's retention") || !strings.Contains(dl.Reason, "1h0m0s (ingest.retention)") {
			t.Fatalf("dead letter reason %q does not say the reading is older than retention", dl.Reason)
		}
	}
	if c := hs.Counts(); c.Readings != 2 {
		t.Fatalf("%d readings stored, want the 2 within retention", c.Readings)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var tooOld float64 = -1
	for _, mf := range mfs {
		if mf.GetName() == "outpost_ingest_too_old_total" {
			tooOld = mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	if tooOld != 2 {
		t.Fatalf("outpost_ingest_too_old_total = %v, want 2", tooOld)
	}
}

// BenchmarkWriter is the ingest path inside the edge for the edgebench
// load without MQTT and without the fsync: 100 devices submitting
// concurrently, 4 messages in flight each, through decode, the queue, the
// group commit and Done. ns/op is per message; cpu-ns/msg is the process's
// CPU (all goroutines) per message, less sensitive to a busy machine; with
// Linger the commits gather more messages.
func BenchmarkWriter(b *testing.B) {
	for _, linger := range []time.Duration{0, time.Millisecond} {
		b.Run("linger="+linger.String(), func(b *testing.B) { benchWriter(b, linger, nil) })
	}
}

// benchWriter runs BenchmarkWriter's load; with rules, a stand-in for the
// rule runner saves after every commit (benchRunner), on a store that
// fsyncs.
func benchWriter(b *testing.B, linger time.Duration, rules *benchRunner) {
	st, err := store.Open(filepath.Join(b.TempDir(), "edge.db"), store.Options{NoSync: rules == nil, HoldOutboxForRules: rules != nil})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	cfg := DefaultConfig()
	cfg.Linger = linger
	if rules != nil {
		cfg.Committed = rules.notify
	}
	w := NewWriter(st, NewDecoder(DefaultLimits), cfg, nil, discardLogger())
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- w.Run(ctx) }()
	defer func() { cancel(); <-ran }()
	if rules != nil {
		stop := rules.start(b, st, w)
		defer stop()
	}

	const devices, window = 100, 4
	var next atomic.Int64
	ts := time.Now().UnixMilli() - 3_600_000
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime(b)
	var wg sync.WaitGroup
	for d := 0; d < devices; d++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			topic := fmt.Sprintf("sensors/dev-%d/telemetry", d)
			slots := make(chan struct{}, window)
			var inflight sync.WaitGroup
			for n := 0; ; n++ {
				if next.Add(1) > int64(b.N) {
					break
				}
				slots <- struct{}{}
				inflight.Add(1)
				id := fmt.Sprintf("d%d-%d", d, n)
				m := &Message{Topic: topic, Received: time.Now(),
					Payload: fmt.Appendf(nil, `{"ts":%d,"id":"%s","metrics":{"temp":%d.5,"hum":%d}}`, ts+int64(n), id, 20+n%10, 40+n%7),
					Done: func(err error) {
						if err != nil {
							b.Error(err)
						}
						<-slots
						inflight.Done()
					}}
				if err := w.Submit(ctx, m); err != nil {
					b.Error(err)
					return
				}
			}
			inflight.Wait()
		}()
	}
	wg.Wait()
	b.StopTimer()
	b.ReportMetric(float64(cpuTime(b)-cpu0)/float64(b.N), "cpu-ns/msg")
	if c := st.Counts(); c.Readings != uint64(b.N) {
		b.Fatalf("%d readings stored, want %d", c.Readings, b.N)
	}
}

// cpuTime is the CPU the process has used.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
