package raftnode

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// startNode runs a one-node cluster (real raft, TCP transport and bbolt
// stores in a temp dir) and waits until it leads.
func startNode(t *testing.T, cfg Config) (*Node, *fsm.FSM, *prometheus.Registry) {
	t.Helper()
	cfg.RaftLogLevel = "error"
	return startNodeLogging(t, cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
}

// startNodeLogging is startNode with the node's logger (and cfg's raft log
// level) given.
func startNodeLogging(t *testing.T, cfg Config, discard *slog.Logger) (*Node, *fsm.FSM, *prometheus.Registry) {
	t.Helper()
	dir := t.TempDir()
	f, err := fsm.Open(filepath.Join(dir, "state.db"), discard, fsm.Hooks{})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	cfg.ID, cfg.RaftBind, cfg.RaftAdvertise, cfg.HTTPAdvertise = "n1", addr, addr, "127.0.0.1:1"
	cfg.DataDir, cfg.Bootstrap = dir, true
	reg := prometheus.NewRegistry()
	n, err := New(cfg, f, hlc.NewClock(nil, time.Minute), discard, reg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); n.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
		if err := n.Shutdown(); err != nil {
			t.Error(err)
		}
		_ = f.Close()
	})
	deadline := time.Now().Add(10 * time.Second)
	for !n.IsLeader() {
		if time.Now().After(deadline) {
			t.Fatal("no leadership within 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	return n, f, reg
}

// A node heartbeats with LeaderHeartbeatTimeout while it leads (half as
// often as HeartbeatTimeout would have it) and keeps HeartbeatTimeout, the
// wait before an election, as a follower.
func TestLeaderHeartbeatTimeout(t *testing.T) {
	n, _, _ := startNode(t, Config{HeartbeatTimeout: 300 * time.Millisecond, ElectionTimeout: 300 * time.Millisecond})
	if n.cfg.LeaderHeartbeatTimeout != 600*time.Millisecond {
		t.Fatalf("default LeaderHeartbeatTimeout %v, want twice HeartbeatTimeout", n.cfg.LeaderHeartbeatTimeout)
	}
	deadline := time.Now().Add(10 * time.Second)
	for rc := n.raft.ReloadableConfig(); rc.HeartbeatTimeout != 600*time.Millisecond || rc.ElectionTimeout != 600*time.Millisecond; rc = n.raft.ReloadableConfig() {
		if time.Now().After(deadline) {
			t.Fatalf("leader runs with heartbeat timeout %v, election timeout %v; want 600ms both", rc.HeartbeatTimeout, rc.ElectionTimeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
	for _, tc := range []struct {
		leading      bool
		hb, election time.Duration
	}{
		{true, 600 * time.Millisecond, 600 * time.Millisecond},
		{false, 300 * time.Millisecond, 300 * time.Millisecond},
	} {
		rc := n.cfg.timeouts(n.raft.ReloadableConfig(), tc.leading)
		if rc.HeartbeatTimeout != tc.hb || rc.ElectionTimeout != tc.election {
			t.Errorf("leading %v: heartbeat %v, election %v; want %v, %v", tc.leading, rc.HeartbeatTimeout, rc.ElectionTimeout, tc.hb, tc.election)
		}
		if err := n.raft.ReloadConfig(rc); err != nil {
			t.Errorf("leading %v: raft refuses %+v: %v", tc.leading, rc, err)
		}
	}
}

func pushCmd(edge string, seq uint64) *fsm.Command {
	return &fsm.Command{Type: fsm.CmdPush, AtMs: 1, Push: &wire.PushBatch{Edge: edge, FirstSeq: seq,
		Changes: []wire.Change{{Kind: wire.KindReadings, Device: edge + "-dev",
			Readings: []wire.Reading{{TS: int64(seq), Metrics: map[string]float64{"v": 1}}}}}}}
}

// entries reads how many entries the group commit has proposed.
func entries(t *testing.T, reg *prometheus.Registry) uint64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "outpost_raft_entry_commands" {
			return mf.GetMetric()[0].GetHistogram().GetSampleCount()
		}
	}
	t.Fatal("outpost_raft_entry_commands not registered")
	return 0
}

// TestGroupCommitPacksConcurrentProposals: many writers proposing at once
// share entries, and each still gets its own result.
func TestGroupCommitPacksConcurrentProposals(t *testing.T) {
	n, f, reg := startNode(t, Config{})
	before := entries(t, reg)
	const writers, each = 48, 20
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			edge := fmt.Sprintf("e%d", w)
			for seq := uint64(1); seq <= each; seq++ {
				res, err := n.Propose(context.Background(), pushCmd(edge, seq))
				if err == nil && (res.Err != nil || res.AckedSeq != seq) {
					err = fmt.Errorf("%s seq %d: result %+v", edge, seq, res)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for w := range writers {
		if got := f.EdgeSeq(fmt.Sprintf("e%d", w)); got != each {
			t.Fatalf("e%d acked %d, want %d", w, got, each)
		}
	}
	// One entry per proposal would be 960; with one entry in flight at a
	// time, proposals made meanwhile share the next.
	if got := entries(t, reg) - before; got > writers*each/4 {
		t.Fatalf("%d proposals took %d entries: group commit is not grouping", writers*each, got)
	}
}

// TestLoneProposalIsNotHeld: with a long GroupCommitWait, a writer alone
// still commits at once (the wait applies only after a busy entry).
func TestLoneProposalIsNotHeld(t *testing.T) {
	n, _, _ := startNode(t, Config{GroupCommitWait: 20 * time.Second})
	for seq := uint64(1); seq <= 3; seq++ {
		start := time.Now()
		if _, err := n.Propose(context.Background(), pushCmd("solo", seq)); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("lone proposal %d took %s: held by the group commit wait", seq, d)
		}
	}
}

// TestGroupCommitStopsWaitingWhenWritersAreBack: the wait for stragglers
// ends as soon as every edge of the previous entry has pushed again, not
// after the gap. With a 2s gap, five rounds of ten edges would take 8s or
// more if each entry waited it out.
func TestGroupCommitStopsWaitingWhenWritersAreBack(t *testing.T) {
	n, _, _ := startNode(t, Config{GroupCommitWait: 8 * time.Second})
	const writers, rounds = 10, 5
	start := time.Now()
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for seq := uint64(1); seq <= rounds; seq++ {
				if _, err := n.Propose(context.Background(), pushCmd(fmt.Sprintf("w%d", w), seq)); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	// At most one wait runs to its gap: the last round's, for edges that
	// have stopped.
	if d := time.Since(start); d > 6*time.Second {
		t.Fatalf("%d rounds of %d edges took %s: entries waited out the gap", rounds, writers, d)
	}
}

// BenchmarkLogAppend appends one 4 KiB entry (a group commit of ~60
// one-reading pushes) per op to the raft log as the node opens it: the fsync
// cost every entry pays on every node, and the floor under a single push's
// latency. It calibrates bench-cloud runs on a shared machine, whose disk
// latency drifts.
func BenchmarkLogAppend(b *testing.B) {
	s, err := openLogStore(filepath.Join(b.TempDir(), "raft.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	data := make([]byte, 4096)
	for i := uint64(1); b.Loop(); i++ {
		if err := s.StoreLogs([]*raft.Log{{Index: i, Term: 1, Type: raft.LogCommand, Data: data}}); err != nil {
			b.Fatal(err)
		}
	}
}
