package raftnode

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/daemontest"
	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// bigPushCmd is a push of k readings: a command of a few KiB.
func bigPushCmd(edge string, seq uint64, k int) *fsm.Command {
	c := &fsm.Command{Type: fsm.CmdPush, AtMs: 1, Push: &wire.PushBatch{Edge: edge, FirstSeq: seq}}
	for i := 0; i < k; i++ {
		c.Push.Changes = append(c.Push.Changes, wire.Change{Kind: wire.KindReadings, Device: edge + "-dev",
			Readings: []wire.Reading{{TS: int64(seq)*10000 + int64(i), Metrics: map[string]float64{"v": float64(i)}}}})
	}
	return c
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	daemontest.Poll(t, 20*time.Second, what, cond)
}

// TestAdmitBurstLargerThanQueue: a burst of concurrent writes several
// times the queue's size is admitted in full (each write waits for room
// instead of being refused), every write applies once, and the queue never
// holds more than its limit (give or take the estimate of one write).
func TestAdmitBurstLargerThanQueue(t *testing.T) {
	const limit = 8 << 10
	n, f, _ := startNode(t, Config{MaxPendingBytes: limit, MaxQueueDelay: -1, AdmitWait: 30 * time.Second,
		MaxWaitingBytes: 1 << 30})
	const writers, each = 24, 3
	sizeOf := func() int64 {
		b, err := fsm.EncodeCommand(bigPushCmd("e00", 1, 60))
		if err != nil {
			t.Fatal(err)
		}
		return int64(len(b))
	}()
	if writers*sizeOf < 4*limit {
		t.Fatalf("the burst (%d B) is not several times the queue (%d B)", writers*sizeOf, limit)
	}
	var peak atomic.Int64
	stop := make(chan struct{})
	var sampler sync.WaitGroup
	sampler.Add(1)
	go func() {
		defer sampler.Done()
		for {
			if p := n.PendingBytes(); p > peak.Load() {
				peak.Store(p)
			}
			select {
			case <-stop:
				return
			default:
				time.Sleep(100 * time.Microsecond)
			}
		}
	}()
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			edge := fmt.Sprintf("e%02d", w)
			for seq := uint64(1); seq <= each; seq++ {
				ctx, release, err := n.Admit(context.Background(), edge, int(sizeOf/4)) // a compressed body
				if err != nil {
					errs <- fmt.Errorf("%s seq %d refused: %w", edge, seq, err)
					return
				}
				if p := n.PendingBytes(); p > peak.Load() {
					peak.Store(p)
				}
				res, err := n.ProposeOrdered(ctx, bigPushCmd(edge, (seq-1)*60+1, 60), nil)
				release()
				if err == nil && res.AckedSeq != seq*60 {
					err = fmt.Errorf("result %+v", res)
				}
				if err != nil {
					errs <- fmt.Errorf("%s seq %d: %w", edge, seq, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	sampler.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	for w := range writers {
		if got := f.EdgeSeq(fmt.Sprintf("e%02d", w)); got != each*60 {
			t.Fatalf("e%02d acked %d, want %d", w, got, each*60)
		}
	}
	// Room is reserved by an estimate (the body is not decoded yet), so
	// allow it one write's worth of error.
	if p := peak.Load(); p > limit+sizeOf {
		t.Fatalf("apply queue peaked at %d bytes, over its limit of %d and one write (%d)", p, limit, sizeOf)
	}
	if p := n.PendingBytes(); p != 0 {
		t.Fatalf("%d bytes still pending after every write returned", p)
	}
}

// TestAdmitAtOnceWithRoom: while the queue has room a write is admitted
// without waiting and without counting as throttled; when the queue is full
// and nothing may wait, the refusal is immediate and says when to retry.
func TestAdmitAtOnceWithRoom(t *testing.T) {
	n, _, reg := startNode(t, Config{MaxPendingBytes: 1 << 20, MaxQueueDelay: -1, AdmitWait: -1})
	for i := range 20 {
		start := time.Now()
		ctx, release, err := n.Admit(context.Background(), "", 1000)
		if err != nil {
			t.Fatalf("admit %d with an empty queue: %v", i, err)
		}
		if d := time.Since(start); d > time.Second {
			t.Fatalf("admit %d with room took %s", i, d)
		}
		if _, err := n.ProposeOrdered(ctx, pushCmd("roomy", uint64(i+1)), nil); err != nil {
			t.Fatal(err)
		}
		release()
	}
	if v := daemontest.Metric(t, reg, "outpost_raft_admissions_total"); v != 0 {
		t.Fatalf("%v writes waited or were refused with room in the queue", v)
	}
	// Fill the queue with one reservation past the limit (whatever ratio
	// of command to body size was learnt, at least a tenth), which an
	// empty queue takes.
	waitFor(t, "an empty queue", func() bool { return n.PendingBytes() == 0 })
	_, hold, err := n.Admit(context.Background(), "", 64<<20)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, _, err = n.Admit(context.Background(), "", 1000)
	var oe *OverloadError
	if !errors.As(err, &oe) || !errors.Is(err, ErrOverloaded) {
		t.Fatalf("admit into a full queue with no waiting: %v, want an *OverloadError", err)
	}
	if d := time.Since(start); d > time.Second || oe.RetryAfter < time.Second {
		t.Fatalf("refusal took %s, retry after %s: want at once, at least 1s", d, oe.RetryAfter)
	}
	hold()
	if _, release, err := n.Admit(context.Background(), "", 1000); err != nil {
		t.Fatalf("admit after the queue emptied: %v", err)
	} else {
		release()
	}
}

// TestAdmitServesWaitersInArrivalOrder: writes that wait for room are
// admitted first come, first served, so none is starved by later ones.
func TestAdmitServesWaitersInArrivalOrder(t *testing.T) {
	n, _, _ := startNode(t, Config{MaxPendingBytes: 1, MaxQueueDelay: -1, AdmitWait: 30 * time.Second,
		MaxWaitingBytes: 1 << 20})
	waitFor(t, "an empty queue", func() bool { return n.PendingBytes() == 0 })
	_, hold, err := n.Admit(context.Background(), "", 10) // the queue is full with this
	if err != nil {
		t.Fatal(err)
	}
	const waiters = 8
	var mu sync.Mutex
	var order []int
	var wg sync.WaitGroup
	for i := range waiters {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, release, err := n.Admit(context.Background(), "", 10)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			order = append(order, i)
			mu.Unlock()
			release() // makes room for the next
		}()
		waitFor(t, fmt.Sprintf("waiter %d in the waiting room", i), func() bool {
			n.adm.mu.Lock()
			defer n.adm.mu.Unlock()
			return len(n.adm.queue) == i+1
		})
	}
	hold()
	wg.Wait()
	for i, w := range order {
		if w != i {
			t.Fatalf("admitted in order %v, want arrival order", order)
		}
	}
	if len(order) != waiters {
		t.Fatalf("%d of %d waiters admitted", len(order), waiters)
	}
}

// TestAdmitRefusesWhatCannotWait: with the waiting room full a write is
// refused at once; one that waits past AdmitWait is refused then and leaves
// the waiting room.
func TestAdmitRefusesWhatCannotWait(t *testing.T) {
	n, _, _ := startNode(t, Config{MaxPendingBytes: 1, MaxQueueDelay: -1, AdmitWait: 300 * time.Millisecond,
		MaxWaitingBytes: 100})
	waitFor(t, "an empty queue", func() bool { return n.PendingBytes() == 0 })
	_, hold, err := n.Admit(context.Background(), "", 10)
	if err != nil {
		t.Fatal(err)
	}
	defer hold()
	if _, _, err := n.Admit(context.Background(), "", 101); !errors.Is(err, ErrOverloaded) {
		t.Fatalf("a body larger than the waiting room: %v, want ErrOverloaded", err)
	}
	start := time.Now()
	_, _, err = n.Admit(context.Background(), "", 50)
	if !errors.Is(err, ErrOverloaded) {
		t.Fatalf("a wait past AdmitWait: %v, want ErrOverloaded", err)
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Fatalf("refused after %s, before AdmitWait", d)
	}
	n.adm.mu.Lock()
	left, waiting := len(n.adm.queue), n.adm.waiting
	n.adm.mu.Unlock()
	if left != 0 || waiting != 0 {
		t.Fatalf("a refused waiter stayed in the waiting room: %d waiters, %d bytes", left, waiting)
	}
}

// TestProposalExpiredInQueueIsNotApplied: a proposal whose deadline passes
// while it waits in the queue (raft busy with an earlier entry) is never
// proposed, and says so: ErrOverloaded, not ErrUnknownOutcome.
func TestProposalExpiredInQueueIsNotApplied(t *testing.T) {
	n, f, _ := startNode(t, Config{MaxInflightEntries: 1, GroupCommitWait: -1})
	n.slots <- struct{}{} // raft's one slot taken: the batcher waits with what is queued
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := n.Propose(ctx, pushCmd("late", 1))
	<-n.slots
	if !errors.Is(err, ErrOverloaded) || errors.Is(err, ErrUnknownOutcome) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("proposal expired in the queue: %v, want ErrOverloaded (deadline exceeded), not unknown outcome", err)
	}
	// The next proposal goes through; the expired one never applied.
	res, err := n.Propose(context.Background(), pushCmd("other", 1))
	if err != nil || res.AckedSeq != 1 {
		t.Fatalf("next proposal: %+v, %v", res, err)
	}
	if got := f.EdgeSeq("late"); got != 0 {
		t.Fatalf("the expired proposal applied (edge acked %d)", got)
	}
	waitFor(t, "an empty queue", func() bool { return n.PendingBytes() == 0 })
}

// TestRefusedWritesComeBackSoon: writes refused at once are told to come
// back in a second, however many were refused before them (a later turn
// each, from the drain rate, left a storm's cluster idle), and to wait in
// the waiting room then.
func TestRefusedWritesComeBackSoon(t *testing.T) {
	n, _, _ := startNode(t, Config{MaxPendingBytes: 1, MaxQueueDelay: -1, AdmitWait: 200 * time.Millisecond,
		MaxWaitingBytes: 1})
	waitFor(t, "an empty queue", func() bool { return n.PendingBytes() == 0 })
	_, hold, err := n.Admit(context.Background(), "", 10)
	if err != nil {
		t.Fatal(err)
	}
	defer hold()
	n.rate.bits.Store(math.Float64bits(10)) // a slow drain: bytes a second
	for i := range 5 {
		_, _, err := n.Admit(context.Background(), fmt.Sprintf("w%d", i), 100)
		var oe *OverloadError
		if !errors.As(err, &oe) {
			t.Fatalf("write %d: %v, want an *OverloadError", i, err)
		}
		if oe.RetryAfter != time.Second {
			t.Fatalf("write %d refused with Retry-After %s, want 1s", i, oe.RetryAfter)
		}
	}
}
