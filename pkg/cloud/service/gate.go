package service

import (
	"context"
	"sync"
	"time"
)

// seqGate orders one edge's pipelined pushes on the leader: a push whose
// predecessor (the push ending at FirstSeq-1) has not been queued for raft
// yet waits for it, up to gateWait. It only delays; correctness stays with
// the state machine's sequence check (a push that gives up waiting and
// arrives early gets the usual gap).
type seqGate struct {
	mu      sync.Mutex
	queuedT map[string]uint64 // edge → last sequence queued for raft on this node
	changed chan struct{}     // closed and replaced on every queued()
}

const gateWait = 2 * time.Second

func newSeqGate() *seqGate {
	return &seqGate{queuedT: map[string]uint64{}, changed: make(chan struct{})}
}

func (g *seqGate) wait(ctx context.Context, edge string, first, committed uint64) {
	if first <= committed+1 {
		return // the usual case (none of the edge's pushes ahead of it): no timer
	}
	deadline := time.NewTimer(gateWait)
	defer deadline.Stop()
	for {
		g.mu.Lock()
		ready := first <= committed+1 || first <= g.queuedT[edge]+1
		ch := g.changed
		g.mu.Unlock()
		if ready {
			return
		}
		select {
		case <-ch:
		case <-deadline.C:
			return
		case <-ctx.Done():
			return
		}
	}
}

func (g *seqGate) queued(edge string, last uint64) {
	g.mu.Lock()
	if last > g.queuedT[edge] {
		g.queuedT[edge] = last
	}
	close(g.changed)
	g.changed = make(chan struct{})
	g.mu.Unlock()
}
