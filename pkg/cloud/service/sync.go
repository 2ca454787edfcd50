package service

import (
	"context"
	"errors"
	"fmt"

	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// The sync API's rules: an edge's numbered stream applies exactly once and
// in order (a batch already committed is acknowledged without a raft entry;
// one that starts past the next expected sequence is refused with that
// sequence), stamps pass the stamp policy first, and the state batch and
// heartbeat are applied ahead of the stream.

// Admit refuses a sync write with ErrOverloaded while the apply queue is
// full. Callers ask before reading the request body, so a busy cloud sheds
// load cheaply.
func (s *Service) Admit() error {
	if s.raft.Overloaded() {
		s.m.throttled.Inc()
		return ErrOverloaded
	}
	return nil
}

// PushOutcome is the result of a push: what the edge is told, and what the
// stamp policy did to the batch.
type PushOutcome struct {
	wire.PushResult
	Stamps StampReport `json:"-"`
}

// Push applies edge's batch b, which it takes ownership of (the stamp policy
// and edge restriction edit it). Errors: wire.ErrInvalid, ErrWrongEdge,
// *SeqGapError (ErrSeqGap), *SeqConflictError (ErrSeqConflict),
// ErrNotLeader, ErrOverloaded, ErrUnknownOutcome.
func (s *Service) Push(ctx context.Context, edge string, b *wire.PushBatch) (PushOutcome, error) {
	if err := b.Validate(); err != nil {
		return PushOutcome{}, err
	}
	if b.Edge != edge {
		return PushOutcome{}, fmt.Errorf("%w: edge %q pushed as %q", ErrWrongEdge, edge, b.Edge)
	}
	// Digests of what the edge sent, before anything edits the batch.
	sums := digests(b.Changes)
	// A re-sent batch that is already committed needs no raft entry, if it
	// is what was committed.
	acked := s.state.EdgeSeq(edge)
	if b.LastSeq() <= acked {
		if err := s.state.CheckResend(edge, b.FirstSeq, sums); err != nil {
			return PushOutcome{}, s.seqConflict(edge, err)
		}
		s.m.pushes.WithLabelValues(edge, "duplicate").Inc()
		return PushOutcome{PushResult: wire.PushResult{AckedSeq: acked}}, nil
	}
	rep, err := s.screen(edge, b.Changes)
	if err != nil {
		return PushOutcome{}, err
	}
	r := s.restrict(ctx, edge, b.Changes)
	// An edge may pipeline pushes: let this one queue only after its
	// predecessor has (bounded wait), so they apply in sequence order
	// instead of the later one bouncing off a gap.
	s.gate.wait(ctx, edge, b.FirstSeq, acked)
	ctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
	defer cancel()
	res, err := s.raft.ProposeOrdered(ctx, &fsm.Command{Type: fsm.CmdPush, AtMs: s.cfg.Now().UnixMilli(), Push: b,
		Refusals: r.refusals, Digests: sums},
		func() { s.gate.queued(edge, b.LastSeq()) })
	if err != nil {
		return PushOutcome{}, kind(err)
	}
	if errors.Is(res.Err, fsm.ErrSeqGap) {
		s.m.pushes.WithLabelValues(edge, "gap").Inc()
		return PushOutcome{}, &SeqGapError{Edge: edge, First: b.FirstSeq, Expected: res.Expected}
	}
	if errors.Is(res.Err, fsm.ErrSeqConflict) {
		return PushOutcome{}, s.seqConflict(edge, res.Err)
	}
	if res.Err != nil {
		return PushOutcome{}, res.Err
	}
	s.m.pushes.WithLabelValues(edge, "ok").Inc()
	n, reasons := refusedResult(r)
	return PushOutcome{PushResult: wire.PushResult{AckedSeq: res.AckedSeq, Applied: res.Applied, Duplicates: res.Duplicates,
		Index: res.Index, RejectedStamps: rep.Dropped(), Refused: n, RefusedReasons: reasons}, Stamps: rep}, nil
}

// seqConflict counts and logs a squatted sequence and wraps err.
func (s *Service) seqConflict(edge string, err error) error {
	s.m.pushes.WithLabelValues(edge, "conflict").Inc()
	s.m.conflicts.WithLabelValues(edge).Inc()
	s.log.Error("an edge re-sent applied sequence numbers with other content; not acknowledged", "edge", edge, "err", err)
	return &SeqConflictError{Edge: edge, Err: err}
}

// screen runs the stamp policy over an edge's changes, counting and logging
// what it did.
func (s *Service) screen(edge string, changes []wire.Change) (StampReport, error) {
	rep, err := s.stamps.Screen(changes)
	if err != nil {
		return StampReport{}, err
	}
	if n := rep.Dropped(); n > 0 {
		s.m.stamps.WithLabelValues(edge).Add(float64(n))
		s.log.Warn("rejected HLC stamps beyond the maximum clock drift; fix the edge's clock", "edge", edge, "fields", n,
			"first_device", rep.Drops[0].Device, "reason", rep.Drops[0].Reason)
	}
	return rep, nil
}

// StateOutcome is the result of a state batch.
type StateOutcome struct {
	wire.StateResult
	Stamps StampReport `json:"-"`
}

// State applies an edge's state changes ahead of its sequenced stream; it
// takes ownership of b. An empty b.Edge means edge. Errors as for Push,
// without the gap.
func (s *Service) State(ctx context.Context, edge string, b *wire.StateBatch) (StateOutcome, error) {
	if b.Edge == "" {
		b.Edge = edge
	}
	if err := b.Validate(); err != nil {
		return StateOutcome{}, err
	}
	if b.Edge != edge {
		return StateOutcome{}, fmt.Errorf("%w: edge %q sent state as %q", ErrWrongEdge, edge, b.Edge)
	}
	rep, err := s.screen(edge, b.Changes)
	if err != nil {
		return StateOutcome{}, err
	}
	if len(b.Changes) == 0 {
		return StateOutcome{}, nil
	}
	r := s.restrict(ctx, edge, b.Changes)
	res, err := s.propose(ctx, &fsm.Command{Type: fsm.CmdState, State: b, Refusals: r.refusals})
	if err != nil {
		return StateOutcome{}, err
	}
	if res.Err != nil {
		return StateOutcome{}, res.Err
	}
	n, reasons := refusedResult(r)
	return StateOutcome{StateResult: wire.StateResult{Applied: res.Applied - n, RejectedStamps: rep.Dropped(),
		Refused: n, RefusedReasons: reasons}, Stamps: rep}, nil
}

// Pull is one page of changes for edge after cursor, with the current
// policies, directory and deployment keys riding along. Errors:
// ErrBadCursor.
func (s *Service) Pull(ctx context.Context, edge, cursor string, limit int) (wire.PullPage, error) {
	page, err := s.state.Pull(edge, cursor, limit)
	if err != nil {
		return wire.PullPage{}, kind(err)
	}
	// The whole current sets ride along: they are small, and an edge that
	// missed any number of changes gets the latest in one page.
	if page.Policies, err = s.state.Policies(); err != nil {
		return wire.PullPage{}, err
	}
	if page.Edges, err = s.Edges(ctx); err != nil {
		return wire.PullPage{}, err
	}
	if jwks, err := s.KeySet(); err == nil {
		page.Keys = jwks
	} else if !errors.Is(err, ErrNotFound) {
		return wire.PullPage{}, err
	}
	page.ServerTimeMs = s.cfg.Now().UnixMilli()
	return page, nil
}

// Heartbeat records an edge's liveness and backlog; an empty h.Edge means
// edge. It also makes sure the deployment has a signing key, so that every
// edge trusts it (from its next pull) before the first phone logs in.
func (s *Service) Heartbeat(ctx context.Context, edge string, h *wire.Heartbeat) (wire.HeartbeatResult, error) {
	if h.Edge == "" {
		h.Edge = edge
	}
	if err := h.Validate(); err != nil {
		return wire.HeartbeatResult{}, err
	}
	if h.Edge != edge {
		return wire.HeartbeatResult{}, fmt.Errorf("%w: edge %q sent a heartbeat as %q", ErrWrongEdge, edge, h.Edge)
	}
	if err := s.ensureSigningKey(ctx); err != nil {
		return wire.HeartbeatResult{}, err
	}
	now := s.cfg.Now()
	res, err := s.propose(ctx, &fsm.Command{Type: fsm.CmdHeartbeat, Heartbeat: h})
	if err != nil {
		return wire.HeartbeatResult{}, err
	}
	s.m.backlog.WithLabelValues(edge).Set(float64(h.Backlog))
	return wire.HeartbeatResult{AckedSeq: res.AckedSeq, ServerTimeMs: now.UnixMilli()}, nil
}
