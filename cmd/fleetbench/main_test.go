package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// lockedBuffer collects the nodes' output, written from exec's copying
// goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// cloudSync builds cmd/cloud-sync into the test's temp dir.
func cloudSync(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "cloud-sync")
	if out, err := exec.Command("go", "build", "-o", bin, "github.com/outpost-edge/outpost/cmd/cloud-sync").CombinedOutput(); err != nil {
		t.Fatalf("go build cloud-sync: %v\n%s", err, out)
	}
	return bin
}

// TestFleet runs the simulator against a real one-node cloud-sync with five
// edges and short phases, and checks that the JSON line's figures are what
// five edges on the syncer's cadence must produce: every edge long-polled
// (a 500ms wait here) and its idle pulls were small and carried no sets,
// no raft entry came from liveness, every backlog was
// drained, every steady reading acknowledged, lags ordered and bounded.
func TestFleet(t *testing.T) {
	if _, err := os.Stat("/proc/self/stat"); err != nil {
		t.Skip("needs /proc")
	}
	bin := cloudSync(t)
	logs := &lockedBuffer{}
	o := options{bin: bin, nodes: 1, edges: 5, idle: 2 * time.Second, pullWait: 500 * time.Millisecond, backlog: 300, rate: 5,
		steady: 2 * time.Second, stormMax: 20 * time.Second, timeout: 60 * time.Second, nodeLog: logs, logf: t.Logf}
	if err := o.check(); err != nil {
		t.Fatal(err)
	}
	rep, err := run(context.Background(), o)
	if err != nil {
		t.Fatalf("run: %v\nnodes' log:\n%s", err, logs.String())
	}
	line, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%s", line)

	// The line carries the figures issue 12 names, by these keys.
	raw := map[string]json.RawMessage{}
	if err := json.Unmarshal(line, &raw); err != nil {
		t.Fatal(err)
	}
	doc := map[string]map[string]any{}
	for _, k := range []string{"params", "idle", "storm", "steady"} {
		m := map[string]any{}
		if err := json.Unmarshal(raw[k], &m); err != nil {
			t.Fatalf("%s: %v in %s", k, err, line)
		}
		doc[k] = m
	}
	for k, keys := range map[string][]string{
		"params": {"edges", "nodes", "backlog", "rate", "pull_interval_ms", "heartbeat_interval_ms"},
		"idle":   {"cpu_per_edge_pct_of_core", "cluster_cpu_pct_of_core", "bytes_per_pull", "raft_entries_per_s", "throttled_429", "leader_rss_peak_mb"},
		"storm":  {"drain_s", "throttled_429", "lag_p50_ms", "lag_p99_ms", "lag_max_ms", "leader_rss_peak_mb"},
		"steady": {"lag_p50_ms", "lag_p99_ms", "lag_max_ms", "throttled_429", "leader_rss_peak_mb"},
	} {
		for _, key := range keys {
			if _, ok := doc[k][key]; !ok {
				t.Errorf("%s.%s missing from %s", k, key, line)
			}
		}
	}
	if _, ok := raw["leader_rss_peak_mb"]; !ok {
		t.Errorf("leader_rss_peak_mb missing from %s", line)
	}

	if rep.Error != "" || rep.NodesAlive != 1 {
		t.Errorf("error %q, nodes alive %d", rep.Error, rep.NodesAlive)
	}
	if rep.LeaderRSSPeakMB <= 0 {
		t.Errorf("leader RSS peak %v MB", rep.LeaderRSSPeakMB)
	}

	for name, l := range map[string]load{"idle": rep.Idle.load, "storm": rep.Storm.load, "steady": rep.Steady.load} {
		// One node: it is the leader, and nothing moves leadership.
		if l.Elections == nil || l.RaftEntriesPerS == nil || l.RaftCommandsPerS == nil {
			t.Fatalf("%s: raft figures missing: %+v", name, l)
		}
		if l.Node != "f0" || !l.NodeWasLeader || *l.Elections != 0 || l.LeaderRSSPeakMB <= 0 || l.MaxNodeRSSPeakMB < l.LeaderRSSPeakMB {
			t.Errorf("%s: node %q (leader %v), %v elections, leader RSS %v MB, largest %v MB",
				name, l.Node, l.NodeWasLeader, *l.Elections, l.LeaderRSSPeakMB, l.MaxNodeRSSPeakMB)
		}
	}

	id := rep.Idle
	// Each edge's pull is held its 500ms wait: in a 2s window it pulls
	// about 4 times (a hot loop, a pull not held, or a dead one fails this).
	if id.Pulls < int64(o.edges)*2 || id.Pulls > int64(o.edges)*6 {
		t.Errorf("idle: %d pulls by %d edges in %.1fs", id.Pulls, o.edges, id.Seconds)
	}
	// An idle pull carries no set (the edges hold the current versions):
	// issue 12's bound of 1 KB, and less than five directory entries.
	if id.BytesPerPull <= 0 || id.BytesPerPull > 1024 || id.BytesPerPull >= 5*80 {
		t.Errorf("idle: %v bytes per pull", id.BytesPerPull)
	}
	// Liveness makes no raft entries.
	if *id.RaftEntriesPerS != 0 {
		t.Errorf("idle: %v raft entries/s", *id.RaftEntriesPerS)
	}
	if id.ClusterCPUPct < 0 || id.CPUPerEdgePct < 0 || *id.RaftEntriesPerS < 0 || id.Failures != 0 {
		t.Errorf("idle: %+v", *id)
	}

	st := rep.Storm
	if !st.Complete || st.DrainedEdges != o.edges || st.Readings != o.edges*o.backlog {
		t.Fatalf("storm: %+v", *st)
	}
	if st.DrainS <= 0 || st.DrainS > o.stormMax.Seconds() || *st.RaftEntriesPerS <= 0 || st.Pushes < int64(o.edges) {
		t.Errorf("storm: drained in %vs, %v raft entries/s, %d pushes", st.DrainS, *st.RaftEntriesPerS, st.Pushes)
	}
	if !(0 < st.LagP50Ms && st.LagP50Ms <= st.LagP99Ms && st.LagP99Ms <= st.LagMaxMs && st.LagMaxMs <= st.DrainS*1000+1) {
		t.Errorf("storm lags p50 %v p99 %v max %v, drain %vs", st.LagP50Ms, st.LagP99Ms, st.LagMaxMs, st.DrainS)
	}

	sd := rep.Steady
	// 5 edges × 5 readings/s × 2s, give or take each edge's first one.
	if sd.Readings < 40 || sd.Readings > 60 || sd.Acked != sd.Readings {
		t.Errorf("steady: %d readings made, %d acknowledged", sd.Readings, sd.Acked)
	}
	// At least the idle tick's floor apart from zero; well under a second
	// on an idle one-node cloud.
	if !(0 < sd.LagP50Ms && sd.LagP50Ms <= sd.LagP99Ms && sd.LagP99Ms <= sd.LagMaxMs && sd.LagMaxMs < 5000) {
		t.Errorf("steady lags p50 %v p99 %v max %v", sd.LagP50Ms, sd.LagP99Ms, sd.LagMaxMs)
	}
	if sd.Pushes == 0 || sd.Failures != 0 {
		t.Errorf("steady: %d pushes, %d failures (%s)", sd.Pushes, sd.Failures, sd.FirstFailure)
	}
}

// TestOptionsCheck: out-of-range flags are refused before anything starts.
func TestOptionsCheck(t *testing.T) {
	good := options{nodes: 3, edges: 1000, idle: time.Second, backlog: 1, rate: 1, steady: time.Second, stormMax: time.Second, timeout: time.Minute}
	if err := good.check(); err != nil {
		t.Fatal(err)
	}
	for name, mut := range map[string]func(*options){
		"no nodes":     func(o *options) { o.nodes = 0 },
		"no edges":     func(o *options) { o.edges = 0 },
		"no backlog":   func(o *options) { o.backlog = 0 },
		"zero rate":    func(o *options) { o.rate = 0 },
		"zero timeout": func(o *options) { o.timeout = 0 },
	} {
		o := good
		mut(&o)
		if err := o.check(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
