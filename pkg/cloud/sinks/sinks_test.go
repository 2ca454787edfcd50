package sinks

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/internal/daemontest"
	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/cloud/raftnode"
	"github.com/outpost-edge/outpost/pkg/config"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/wire"
)

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// cluster is a one-node raft cluster (real raft, TCP transport, bbolt
// stores in a temp dir) that leads.
type cluster struct {
	raft  *raftnode.Node
	state *fsm.FSM
	seq   uint64
}

func startCluster(t *testing.T) *cluster {
	t.Helper()
	dir := t.TempDir()
	f, err := fsm.Open(filepath.Join(dir, "state.db"), discard(), fsm.Hooks{})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	cfg := raftnode.DefaultConfig()
	cfg.ID, cfg.RaftBind, cfg.RaftAdvertise, cfg.HTTPAdvertise = "n1", addr, addr, "127.0.0.1:1"
	cfg.DataDir, cfg.Bootstrap, cfg.RaftLogLevel = dir, true, "error"
	n, err := raftnode.New(cfg, f, hlc.NewClock(nil, time.Minute), discard(), prometheus.NewRegistry())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); n.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
		_ = n.Shutdown()
		_ = f.Close()
	})
	waitFor(t, "leadership", func() bool { return n.IsLeader() })
	return &cluster{raft: n, state: f}
}

// push commits one reading of device dev and returns its raft index.
func (c *cluster) push(t *testing.T, dev string) uint64 {
	t.Helper()
	c.seq++
	res, err := c.raft.Propose(context.Background(), &fsm.Command{Type: fsm.CmdPush, AtMs: 1,
		Push: &wire.PushBatch{Edge: "e1", FirstSeq: c.seq, Changes: []wire.Change{{Kind: wire.KindReadings, Device: dev,
			Readings: []wire.Reading{{TS: int64(c.seq), Metrics: map[string]float64{"v": float64(c.seq)}}}}}}})
	if err != nil || res.Err != nil {
		t.Fatalf("push: %v %v", err, res.Err)
	}
	return res.Index
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	daemontest.Poll(t, 20*time.Second, what, cond)
}

// memSink is a sink in memory that can be taken down.
type memSink struct {
	mu     sync.Mutex
	down   bool
	got    []Message
	dials  int
	closed int
}

func (s *memSink) dial(context.Context, Config, *slog.Logger) (Publisher, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.dials++
	if s.down {
		return nil, errors.New("connection refused")
	}
	return &memPublisher{s}, nil
}

func (s *memSink) setDown(d bool) {
	s.mu.Lock()
	s.down = d
	s.mu.Unlock()
}

func (s *memSink) messages() []Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Message(nil), s.got...)
}

type memPublisher struct{ s *memSink }

func (p *memPublisher) Publish(_ context.Context, msgs []Message) error {
	p.s.mu.Lock()
	defer p.s.mu.Unlock()
	if p.s.down {
		// Half the batch arrives before the failure: the retry re-sends it.
		p.s.got = append(p.s.got, msgs[:len(msgs)/2]...)
		return errors.New("sink went away")
	}
	p.s.got = append(p.s.got, msgs...)
	return nil
}

func (p *memPublisher) Close() {
	p.s.mu.Lock()
	p.s.closed++
	p.s.mu.Unlock()
}

func runManager(t *testing.T, c *cluster, opts Options, d Dialer, reg prometheus.Registerer) *Manager {
	t.Helper()
	m := New(opts, c.raft, c.state, discard(), reg, d)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); m.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return m
}

// checkDelivery asserts that got holds every record of the export log in
// order once (duplicates only as a re-sent run with the same keys and
// values), and returns the distinct keys in order.
func checkDelivery(t *testing.T, state *fsm.FSM, got []Message) []string {
	t.Helper()
	var want []Message
	if _, err := state.Export("", 1<<30, func(r *fsm.ExportRecord) error {
		v, _ := json.Marshal(r)
		want = append(want, Message{Key: r.Cursor, Value: v})
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	first := map[string]string{}
	var keys []string
	for _, m := range got {
		if v, dup := first[m.Key]; dup {
			if v != string(m.Value) {
				t.Fatalf("key %s delivered twice with different values", m.Key)
			}
			continue
		}
		first[m.Key] = string(m.Value)
		keys = append(keys, m.Key)
	}
	if len(keys) != len(want) {
		t.Fatalf("%d distinct records delivered, %d in the log", len(keys), len(want))
	}
	for i, w := range want {
		if keys[i] != w.Key || first[w.Key] != string(w.Value) {
			t.Fatalf("record %d: delivered %s %s, want %s %s", i, keys[i], first[keys[i]], w.Key, w.Value)
		}
	}
	return keys
}

func cursorOf(t *testing.T, c *cluster, sink string) uint64 {
	t.Helper()
	v, _, err := c.state.SinkCursor(sink)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestPublishesInOrderAndReplicatesCursor: every committed record reaches
// the sink once, in order, as the export API's JSON keyed by its cursor;
// the cursor is replicated in batches (not an entry per record), reaches
// the last record's index, and an idle sink proposes nothing.
func TestPublishesInOrderAndReplicatesCursor(t *testing.T) {
	c := startCluster(t)
	mem := &memSink{}
	for range 5 {
		c.push(t, "d1")
	}
	before := c.state.AppliedIndex()
	m := runManager(t, c, Options{Sinks: []Config{{Name: "mem", Type: TypeNATS}}, CursorInterval: 50 * time.Millisecond, Batch: 3}, mem.dial, nil)
	var last uint64
	for i := range 40 {
		last = c.push(t, fmt.Sprintf("d%d", i%3))
	}
	waitFor(t, "all records delivered", func() bool { return len(mem.messages()) == 45 })
	waitFor(t, "cursor at the last record", func() bool { return cursorOf(t, c, "mem") >= last })
	checkDelivery(t, c.state, mem.messages())
	if n := c.state.AppliedIndex() - before - 40; n > 30 {
		t.Fatalf("%d cursor entries for 45 records: the cursor is not batched", n)
	}
	// Idle: nothing moved, nothing proposed.
	idle := c.state.AppliedIndex()
	time.Sleep(300 * time.Millisecond) // six cursor intervals
	if got := c.state.AppliedIndex(); got != idle {
		t.Fatalf("an idle sink proposed %d entries", got-idle)
	}
	sts, err := m.Status()
	if err != nil || len(sts) != 1 {
		t.Fatal(sts, err)
	}
	if s := sts[0]; !s.Active || s.LagRecords != 0 || s.LagEntries != 0 || !s.LagExact || s.Published != 45 || s.Cursor < last || s.LastError != "" {
		t.Fatalf("status %+v", s)
	}
}

// TestDownSinkBacksOffAndCatchesUp: a sink that refuses connections and
// fails mid-batch is retried with backoff (the error and the lag are
// visible meanwhile); when it returns it receives everything, in order,
// duplicates only of a re-sent batch with the same keys.
func TestDownSinkBacksOffAndCatchesUp(t *testing.T) {
	c := startCluster(t)
	mem := &memSink{}
	reg := prometheus.NewRegistry()
	m := runManager(t, c, Options{Sinks: []Config{{Name: "mem", Type: TypeKafka, Brokers: []string{"b:9092"}, Topic: "t"}},
		CursorInterval: 20 * time.Millisecond, RetryMax: 50 * time.Millisecond, Batch: 4}, mem.dial, reg)
	for range 6 {
		c.push(t, "d1")
	}
	waitFor(t, "first records", func() bool { return len(mem.messages()) == 6 })
	mem.setDown(true)
	for range 10 {
		c.push(t, "d2")
	}
	var st Status
	waitFor(t, "failures reported", func() bool {
		sts, err := m.Status()
		if err != nil {
			t.Fatal(err)
		}
		st = sts[0]
		mem.mu.Lock()
		defer mem.mu.Unlock()
		return st.Failures >= 3 && mem.dials >= 3
	})
	if st.LastError == "" || st.LastErrorAt == 0 || st.LagRecords == 0 || st.LagEntries == 0 {
		t.Fatalf("status of a down sink %+v", st)
	}
	if got := gather(t, reg, "outpost_cloud_sink_failures_total"); got < 3 {
		t.Fatalf("failures metric %v", got)
	}
	if got := gather(t, reg, "outpost_cloud_sink_lag_records"); got == 0 {
		t.Fatal("lag metric 0 while the sink is down")
	}
	mem.setDown(false)
	waitFor(t, "catch-up", func() bool {
		sts, _ := m.Status()
		return sts[0].LagRecords == 0 && len(mem.messages()) >= 16
	})
	keys := checkDelivery(t, c.state, mem.messages())
	if len(keys) != 16 {
		t.Fatalf("%d records", len(keys))
	}
}

// TestResumesFromReplicatedCursor: a new publisher (a new leader's) starts
// after the replicated cursor, re-sending nothing the cursor covers.
func TestResumesFromReplicatedCursor(t *testing.T) {
	c := startCluster(t)
	first := &memSink{}
	ctx, cancel := context.WithCancel(context.Background())
	m := New(Options{Sinks: []Config{{Name: "mem", Type: TypeNATS}}, CursorInterval: time.Millisecond}, c.raft, c.state, discard(), nil, first.dial)
	done := make(chan struct{})
	go func() { defer close(done); m.Run(ctx) }()
	var last uint64
	for range 5 {
		last = c.push(t, "d1")
	}
	waitFor(t, "cursor", func() bool { return cursorOf(t, c, "mem") >= last })
	cancel()
	<-done
	for range 3 {
		c.push(t, "d1")
	}
	second := &memSink{}
	runManager(t, c, Options{Sinks: []Config{{Name: "mem", Type: TypeNATS}}}, second.dial, nil)
	waitFor(t, "the rest", func() bool { return len(second.messages()) >= 3 })
	if got := second.messages(); len(got) != 3 {
		t.Fatalf("resumed with %d records, want the 3 after the cursor", len(got))
	}
	checkDelivery(t, c.state, append(first.messages(), second.messages()...))
}

func gather(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				if g := m.GetGauge(); g != nil {
					return g.GetValue()
				}
				if c := m.GetCounter(); c != nil {
					return c.GetValue()
				}
			}
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

func TestOptionsValidate(t *testing.T) {
	nats := func(mod func(*Config)) Options {
		c := Config{Name: "js", Type: TypeNATS, URL: "nats://127.0.0.1:4222", Subject: "outpost.export"}
		mod(&c)
		return Options{Sinks: []Config{c}}
	}
	kafka := func(mod func(*Config)) Options {
		c := Config{Name: "k", Type: TypeKafka, Brokers: []string{"127.0.0.1:9092"}, Topic: "outpost-export"}
		mod(&c)
		return Options{Sinks: []Config{c}}
	}
	for _, tc := range []struct {
		name string
		opts Options
		want []string // problem keys; none: valid
	}{
		{"no sinks", Options{}, nil},
		{"nats", nats(func(*Config) {}), nil},
		{"nats with stream and two servers", nats(func(c *Config) { c.Stream = "OUT"; c.URL = "nats://a:4222, tls://u:p@b:4222" }), nil},
		{"kafka", kafka(func(*Config) {}), nil},
		{"no name", nats(func(c *Config) { c.Name = "" }), []string{"export.sinks[0].name"}},
		{"bad name", nats(func(c *Config) { c.Name = "a.b" }), []string{"export.sinks[0].name"}},
		{"no type", nats(func(c *Config) { c.Type = "" }), []string{"export.sinks[0].type"}},
		{"unknown type", nats(func(c *Config) { c.Type = "pulsar" }), []string{"export.sinks[0].type"}},
		{"nats without url and subject", nats(func(c *Config) { c.URL, c.Subject = "", "" }), []string{"export.sinks[0].url", "export.sinks[0].subject"}},
		{"nats http url", nats(func(c *Config) { c.URL = "http://a:4222" }), []string{"export.sinks[0].url"}},
		{"nats wildcard subject", nats(func(c *Config) { c.Subject = "outpost.>" }), []string{"export.sinks[0].subject"}},
		{"nats empty token", nats(func(c *Config) { c.Subject = "outpost..x" }), []string{"export.sinks[0].subject"}},
		{"nats bad stream", nats(func(c *Config) { c.Stream = "a b" }), []string{"export.sinks[0].stream"}},
		{"nats with a topic", nats(func(c *Config) { c.Topic = "t" }), []string{"export.sinks[0]"}},
		{"kafka without brokers and topic", kafka(func(c *Config) { c.Brokers, c.Topic = nil, "" }), []string{"export.sinks[0].brokers", "export.sinks[0].topic"}},
		{"kafka bad broker", kafka(func(c *Config) { c.Brokers = []string{"nohostport"} }), []string{"export.sinks[0].brokers"}},
		{"kafka bad topic", kafka(func(c *Config) { c.Topic = "a/b" }), []string{"export.sinks[0].topic"}},
		{"kafka with a subject", kafka(func(c *Config) { c.Subject = "s" }), []string{"export.sinks[0]"}},
		{"duplicate names", Options{Sinks: append(nats(func(*Config) {}).Sinks, nats(func(*Config) {}).Sinks...)}, []string{"export.sinks[1].name"}},
		{"bad tuning", Options{CursorInterval: -1, RetryMax: -1, Batch: 20000}, []string{"export.cursor_interval", "export.retry_max", "export.batch"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var errs config.Errors
			tc.opts.Validate("export", &errs)
			var keys []string
			for _, p := range errs {
				keys = append(keys, p.Key)
			}
			if strings.Join(keys, ",") != strings.Join(tc.want, ",") {
				t.Fatalf("problems %v, want keys %v", errs, tc.want)
			}
		})
	}
}

func TestTargetHidesPasswords(t *testing.T) {
	c := Config{Name: "js", Type: TypeNATS, URL: "nats://u:secret@a:4222,nats://b:4222", Subject: "s"}
	if got := c.Masked().URL; got != "nats://u:"+config.Mask+"@a:4222,nats://b:4222" || strings.Contains(c.Target(), "secret") {
		t.Fatalf("password shown: %s %s", got, c.Target())
	}
}

// TestForgetRemovedSink: the cursor of a sink no longer configured is
// listed as such (it holds log retention back) until Forget drops it; a
// configured sink or an unknown name is refused.
func TestForgetRemovedSink(t *testing.T) {
	c := startCluster(t)
	old := &memSink{}
	ctx, cancel := context.WithCancel(context.Background())
	m := New(Options{Sinks: []Config{{Name: "old", Type: TypeNATS}}, CursorInterval: time.Millisecond}, c.raft, c.state, discard(), nil, old.dial)
	done := make(chan struct{})
	go func() { defer close(done); m.Run(ctx) }()
	last := c.push(t, "d1")
	waitFor(t, "old's cursor", func() bool { return cursorOf(t, c, "old") >= last })
	cancel()
	<-done

	m = runManager(t, c, Options{Sinks: []Config{{Name: "new", Type: TypeNATS}}}, (&memSink{}).dial, nil)
	waitFor(t, "new registered", func() bool { _, ok, _ := c.state.SinkCursor("new"); return ok })
	sts, err := m.Status()
	if err != nil || len(sts) != 2 || sts[0].Name != "new" || !sts[0].Configured || sts[1].Name != "old" || sts[1].Configured || sts[1].Cursor < last {
		t.Fatalf("status %+v %v", sts, err)
	}
	for name, want := range map[string]error{"new": ErrSinkConfigured, "nope": ErrUnknownSink} {
		if err := m.Forget(context.Background(), name); !errors.Is(err, want) {
			t.Fatalf("forget %s: %v, want %v", name, err, want)
		}
	}
	if err := m.Forget(context.Background(), "old"); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := c.state.SinkCursor("old"); ok {
		t.Fatal("old's cursor survived Forget")
	}
	if sts, _ := m.Status(); len(sts) != 1 {
		t.Fatalf("status after forget %+v", sts)
	}
}
