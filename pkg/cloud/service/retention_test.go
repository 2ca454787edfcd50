package service

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/daemontest"
	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// TestRetentionRunsOnTheLeader runs the leader's retention loop with short
// windows against a real raft node: old readings and old log entries go,
// recent readings and device records stay, and an export consumer whose
// cursor fell behind the compacted start is told so.
func TestRetentionRunsOnTheLeader(t *testing.T) {
	n := startService(t, Config{Retention: time.Second, LogRetention: 300 * time.Millisecond})
	ctx := context.Background()
	// A reading an hour ahead stays however slowly this test runs.
	now := time.Now().Add(time.Hour).UnixMilli()
	old := now - 2*time.Hour.Milliseconds()
	b := &wire.PushBatch{Edge: "e1", FirstSeq: 1, Changes: []wire.Change{
		{Kind: wire.KindReadings, Device: "dev", Readings: []wire.Reading{
			{TS: old, ID: "old", Metrics: map[string]float64{"v": 1}},
			{TS: now, ID: "new", Metrics: map[string]float64{"v": 2}},
		}},
	}}
	if _, err := n.svc.Push(ctx, "e1", b); err != nil {
		t.Fatal(err)
	}
	first := ""
	if _, err := n.svc.Export(ctx, "", 10, func(r *fsm.ExportRecord) error { first = r.Cursor; return nil }); err != nil || first == "" {
		t.Fatalf("export before compaction: %q %v", first, err)
	}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); n.svc.RunRetention(rctx) }()
	t.Cleanup(func() { cancel(); <-done })

	deadline := time.Now().Add(30 * time.Second)
	for {
		rs, _, err := n.fsm.Readings(fsm.ReadingsQuery{Device: "dev", Limit: 10})
		if err != nil {
			t.Fatal(err)
		}
		_, xerr := n.svc.Export(ctx, "0.0", 10, func(*fsm.ExportRecord) error { return nil })
		if len(rs) == 1 && errors.Is(xerr, ErrCompacted) {
			if rs[0].TS != now {
				t.Fatalf("kept the reading at %d, want the recent one at %d", rs[0].TS, now)
			}
			var ce *fsm.CompactedError
			if !errors.As(xerr, &ce) || ce.Earliest == "0" {
				t.Fatalf("compacted export error %v names no earliest cursor", xerr)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 30s: %d readings kept, export error %v", len(rs), xerr)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := n.fsm.GetDevice("dev"); err != nil {
		t.Fatalf("the device record went with its readings: %v", err)
	}
	if got := daemontest.Metric(t, n.reg, "outpost_cloud_compacted_total", "what", fsm.CompactReadings); got != 1 {
		t.Fatalf("compacted readings counter %v, want 1", got)
	}
}
