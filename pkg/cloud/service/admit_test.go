package service

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/daemontest"
	"github.com/outpost-edge/outpost/pkg/cloud/raftnode"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// TestPushBurstIsAdmittedNotRefused: a burst of concurrent pushes several
// times the apply queue's size all get in, in full and each once, by
// waiting for room: none is refused (no 429 for the edges), and the
// throttled counter stays at zero.
func TestPushBurstIsAdmittedNotRefused(t *testing.T) {
	n := startServiceRaft(t, Config{}, raftnode.Config{MaxPendingBytes: 16 << 10, MaxQueueDelay: -1,
		AdmitWait: 30 * time.Second, MaxWaitingBytes: 1 << 30})
	const edges, pushes, each = 16, 3, 50
	var wg sync.WaitGroup
	errs := make(chan error, edges)
	for e := range edges {
		edge := fmt.Sprintf("b%02d", e)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for p := range pushes {
				b := readingsBatch(edge, uint64(p*each+1), each)
				ctx, release, err := n.svc.Admit(context.Background(), edge, 2000)
				if err != nil {
					errs <- fmt.Errorf("%s push %d refused: %w", edge, p, err)
					return
				}
				out, err := n.svc.Push(ctx, edge, b)
				release()
				if err == nil && out.AckedSeq != uint64((p+1)*each) {
					err = fmt.Errorf("acked %d", out.AckedSeq)
				}
				if err != nil {
					errs <- fmt.Errorf("%s push %d: %w", edge, p, err)
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
	for e := range edges {
		if got := n.fsm.EdgeSeq(fmt.Sprintf("b%02d", e)); got != pushes*each {
			t.Fatalf("b%02d acked %d, want %d", e, got, pushes*each)
		}
	}
	if v := daemontest.Metric(t, n.reg, "outpost_cloud_push_throttled_total"); v != 0 {
		t.Fatalf("outpost_cloud_push_throttled_total = %v with a queue that makes room", v)
	}
}

// TestAdmitRefusalSaysWhenToRetry: a write the queue has no room for, with
// no waiting allowed, is ErrOverloaded with a Retry-After estimate, and is
// counted as throttled.
func TestAdmitRefusalSaysWhenToRetry(t *testing.T) {
	n := startServiceRaft(t, Config{}, raftnode.Config{MaxPendingBytes: 1, MaxQueueDelay: -1, AdmitWait: -1})
	awaitEmptyQueue(t, n.raft)
	_, hold, err := n.svc.Admit(context.Background(), "e1", 100)
	if err != nil {
		t.Fatal(err)
	}
	defer hold()
	_, _, err = n.svc.Admit(context.Background(), "e1", 100)
	var oe *OverloadedError
	if !errors.Is(err, ErrOverloaded) || !errors.As(err, &oe) || oe.RetryAfter < time.Second {
		t.Fatalf("admit into a full queue: %v, want an *OverloadedError with a Retry-After of 1s or more", err)
	}
	if v := daemontest.Metric(t, n.reg, "outpost_cloud_push_throttled_total"); v != 1 {
		t.Fatalf("outpost_cloud_push_throttled_total = %v, want 1", v)
	}
}

// readingsBatch is a push of n changes from first, one reading each of the
// edge's own device.
func readingsBatch(edge string, first uint64, n int) *wire.PushBatch {
	b := &wire.PushBatch{Edge: edge, FirstSeq: first}
	for i := range n {
		seq := first + uint64(i)
		b.Changes = append(b.Changes, wire.Change{Kind: wire.KindReadings, Device: edge + "-dev",
			Readings: []wire.Reading{{TS: int64(seq), Metrics: map[string]float64{"v": float64(seq)}}}})
	}
	return b
}

// TestAdmitWaitCountsAgainstTheRequestTimeout: the wait for room is part
// of the request's RequestTimeout, so a write is answered within it (a
// follower forwarding it waits no longer than that for the leader).
func TestAdmitWaitCountsAgainstTheRequestTimeout(t *testing.T) {
	n := startServiceRaft(t, Config{RequestTimeout: 300 * time.Millisecond},
		raftnode.Config{MaxPendingBytes: 1, MaxQueueDelay: -1, AdmitWait: 30 * time.Second, MaxWaitingBytes: 1 << 20})
	awaitEmptyQueue(t, n.raft)
	_, hold, err := n.svc.Admit(context.Background(), "e1", 100)
	if err != nil {
		t.Fatal(err)
	}
	defer hold()
	start := time.Now()
	_, _, err = n.svc.Admit(context.Background(), "e1", 100)
	if !errors.Is(err, ErrOverloaded) {
		t.Fatalf("admit into a queue that makes no room: %v, want ErrOverloaded", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("refused after %s: the admission wait (30s) outlived the request timeout (300ms)", d)
	}
}

// awaitEmptyQueue waits until nothing is queued or in flight: a new
// leader's own first entry may still be.
func awaitEmptyQueue(t *testing.T, rn *raftnode.Node) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for rn.PendingBytes() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the apply queue did not empty within 20s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
