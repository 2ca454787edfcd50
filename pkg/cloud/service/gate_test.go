package service

import (
	"context"
	"testing"
	"testing/synctest"
	"time"
)

// TestSeqGate runs the gate on synctest's fake clock: a push waits exactly
// until its predecessor is queued (by sequence, per edge), or gateWait, or
// its context ends.
func TestSeqGate(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newSeqGate()
		wait := func(ctx context.Context, edge string, first, committed uint64) <-chan struct{} {
			done := make(chan struct{})
			go func() { defer close(done); g.wait(ctx, edge, first, committed) }()
			synctest.Wait()
			return done
		}
		returned := func(done <-chan struct{}) bool {
			synctest.Wait()
			select {
			case <-done:
				return true
			default:
				return false
			}
		}
		ctx := context.Background()

		if !returned(wait(ctx, "e1", 4, 3)) {
			t.Fatal("a push right after the committed sequence waited")
		}
		w := wait(ctx, "e1", 4, 0)
		if returned(w) {
			t.Fatal("a push returned before its predecessor was queued")
		}
		g.queued("e2", 3) // another edge's stream
		g.queued("e1", 2) // not yet the predecessor
		if returned(w) {
			t.Fatal("a push returned before its own predecessor (seq 3) was queued")
		}
		g.queued("e1", 3)
		if !returned(w) {
			t.Fatal("a push still waits after its predecessor was queued")
		}
		if !returned(wait(ctx, "e1", 2, 0)) {
			t.Fatal("a push behind what is already queued waited")
		}

		w = wait(ctx, "e1", 10, 0)
		time.Sleep(gateWait - time.Millisecond)
		if returned(w) {
			t.Fatal("the gate gave up before gateWait")
		}
		time.Sleep(time.Millisecond)
		if !returned(w) {
			t.Fatal("the gate waited beyond gateWait")
		}

		cctx, cancel := context.WithCancel(ctx)
		w = wait(cctx, "e1", 10, 0)
		cancel()
		if !returned(w) {
			t.Fatal("the gate ignored its context")
		}
	})
}
