package service

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/cloud/raftnode"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// The sync API's rules: an edge's numbered stream applies exactly once and
// in order (a batch already committed is acknowledged without a raft entry;
// one that starts past the next expected sequence is refused with that
// sequence), stamps pass the stamp policy first, and the state batch and
// heartbeat are applied ahead of the stream.

// Admit admits edge's sync write whose body is size bytes into the apply queue
// before the body is decoded: it waits, first come first served and for a
// bounded time, for room in the queue, or refuses at once with an
// *OverloadedError (ErrOverloaded) when the wait would be too long or too
// many bodies are waiting already. Propose the write with the returned
// context, which carries its room in the queue, and call release when the
// request ends. Errors: ErrOverloaded, ErrNotLeader.
//
// The request's deadline (RequestTimeout) starts here, so that the wait for
// room counts against it: a push a follower forwards is answered within the
// follower's wait for the leader.
func (s *Service) Admit(ctx context.Context, edge string, size int) (context.Context, func(), error) {
	rctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
	actx, release, err := s.raft.Admit(rctx, edge, size)
	if err != nil {
		cancel()
		if errors.Is(err, raftnode.ErrOverloaded) {
			s.m.throttled.Inc()
		}
		return ctx, func() {}, kind(err)
	}
	return actx, func() { release(); cancel() }, nil
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
	// b is not used past the proposal: once it is encoded in the queue,
	// the decoded changes (several times its size) are garbage, not held
	// for the whole commit.
	first, last := b.FirstSeq, b.LastSeq()
	res, err := s.raft.ProposeOrdered(ctx, &fsm.Command{Type: fsm.CmdPush, AtMs: s.cfg.Now().UnixMilli(), Push: b,
		Refusals: r.refusals, Digests: sums},
		func() { s.gate.queued(edge, last) })
	if err != nil {
		if errors.Is(err, raftnode.ErrOverloaded) {
			s.m.throttled.Inc()
		}
		return PushOutcome{}, kind(err)
	}
	if errors.Is(res.Err, fsm.ErrSeqGap) {
		s.m.pushes.WithLabelValues(edge, "gap").Inc()
		return PushOutcome{}, &SeqGapError{Edge: edge, First: first, Expected: res.Expected}
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

// PullRequest is one pull of an edge.
type PullRequest struct {
	Cursor string
	Limit  int
	// Have is the set versions the edge holds; nil for an edge that sent
	// none, which gets every set whole and is never held.
	Have *wire.SetVersions
	// Wait is how long the edge lets an empty pull be held (capped at
	// Config.PullHold).
	Wait time.Duration
}

// Pull is one page of changes for edge after the request's cursor, with the
// sets that moved riding along. An empty page is held until something for
// the edge commits, the directory or a set moves, the wait ends, leadership
// moves or ctx ends (then the page is returned as it is, empty: the edge
// pulls again). Run on the leader, which keeps the soft state the directory
// is built from and the pull positions. A pull counts as the edge's
// liveness. Errors: ErrNotLeader, ErrBadCursor.
func (s *Service) Pull(ctx context.Context, edge string, req PullRequest) (wire.PullPage, error) {
	if !s.raft.IsLeader() {
		return wire.PullPage{}, ErrNotLeader
	}
	now := s.cfg.Now()
	s.live.lead(true, now.UnixMilli())
	s.touch(edge, now.UnixMilli())
	s.live.observe(edge, req.Cursor, func() string { return s.state.PullPosition(edge) })
	wait := min(req.Wait, s.cfg.PullHold)
	if req.Have == nil {
		wait = 0
	}
	var timeout <-chan time.Time
	if wait > 0 {
		t := time.NewTimer(wait)
		defer t.Stop()
		timeout = t.C
	}
	for {
		changed := s.state.PullWatch(edge)
		moved := s.live.watch()
		page, news, err := s.pullOnce(edge, req)
		if err != nil || news || wait <= 0 {
			return page, err
		}
		if !s.hold(ctx, changed, moved, timeout) {
			return page, nil
		}
	}
}

// hold waits for a held pull's next look; false: return the page as it is.
func (s *Service) hold(ctx context.Context, changed, moved <-chan struct{}, timeout <-chan time.Time) bool {
	s.m.heldPulls.Inc()
	defer s.m.heldPulls.Dec()
	select {
	case <-changed:
		return true
	case <-moved: // nil on a follower's hold: never
		return s.raft.IsLeader()
	case <-timeout:
	case <-ctx.Done():
	}
	return false
}

// AwaitPull is the part of a held pull a follower does itself, so that it
// holds no connection to the leader while nothing is there: it returns
// (true) once its own replica has something for the edge after the cursor,
// or a policy or key set other than the edge holds, or (false) when the
// wait (capped at PullHold) or ctx ends. Either way the caller then
// forwards the pull to the leader, which builds the page (the directory is
// the leader's) and counts the edge alive; after a false return it asks
// the leader not to hold it again. Directory changes therefore reach an
// edge that pulls through a follower at the end of its wait, changes for
// it at once.
func (s *Service) AwaitPull(ctx context.Context, edge string, req PullRequest) bool {
	wait := min(req.Wait, s.cfg.PullHold)
	if req.Have == nil || wait <= 0 {
		return true
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		changed := s.state.PullWatch(edge)
		page, err := s.state.Pull(edge, req.Cursor, 1)
		if err != nil || len(page.Changes) > 0 || page.More {
			return true // the leader answers errors too
		}
		sets, err := s.sets()
		if err != nil || sets.policiesVer != req.Have.Policies || sets.keysVer != req.Have.Keys {
			return true
		}
		if _, ver := sets.rulesFor(s.edgeRegion(edge)); ver != req.Have.Rules {
			return true
		}
		if !s.hold(ctx, changed, nil, t.C) {
			return false
		}
	}
}

// pullOnce builds one page; news says it carries something for the edge.
func (s *Service) pullOnce(edge string, req PullRequest) (wire.PullPage, bool, error) {
	page, err := s.state.Pull(edge, req.Cursor, req.Limit)
	if err != nil {
		return wire.PullPage{}, false, kind(err)
	}
	news := len(page.Changes) > 0 || page.More
	now := s.cfg.Now().UnixMilli()
	if err := s.refreshDirectory(now, false); err != nil {
		return wire.PullPage{}, false, err
	}
	sets, err := s.sets()
	if err != nil {
		return wire.PullPage{}, false, err
	}
	page.ServerTimeMs = now
	if req.Have == nil {
		// An edge that does not version its sets gets them whole.
		page.Policies, page.Keys, page.Edges = sets.policies, sets.keys, s.live.all()
		return page, news, nil
	}
	v := wire.SetVersions{Policies: sets.policiesVer, Keys: sets.keysVer}
	if v.Policies != req.Have.Policies {
		page.Policies, news = sets.policies, true
	}
	if v.Keys != req.Have.Keys {
		page.Keys, news = sets.keys, true
	}
	var rs []json.RawMessage
	if rs, v.Rules = sets.rulesFor(s.edgeRegion(edge)); v.Rules != req.Have.Rules {
		page.Rules, news = rs, true
	}
	var urgent bool
	page.Directory, v.Directory, urgent = s.live.delta(req.Have.Directory)
	news = news || urgent
	page.Versions = &v
	return page, news, nil
}

// pullSets is the policies, keys and rules as pulls carry them, with versions.
type pullSets struct {
	at          uint64 // the state's SetsIndex they were read at
	policies    []wire.Policy
	policiesVer string
	keys        json.RawMessage
	keysVer     string
	rules       []fsm.RuleRecord

	regionMu sync.Mutex
	byRegion map[string]regionRules // rulesFor's memo
}

// regionRules is the rules an edge of one region pulls, with their version.
type regionRules struct {
	rules []json.RawMessage
	ver   string
}

// rulesFor returns the rules distributed to the edges of region (those
// limited to it and those of every region) and their version ("" when
// there are none).
func (ps *pullSets) rulesFor(region string) ([]json.RawMessage, string) {
	ps.regionMu.Lock()
	defer ps.regionMu.Unlock()
	if rr, ok := ps.byRegion[region]; ok {
		return rr.rules, rr.ver
	}
	var rr regionRules
	h := sha256.New()
	for _, r := range ps.rules { // by name
		if r.Region != "" && r.Region != region {
			continue
		}
		rr.rules = append(rr.rules, r.Rule)
		fmt.Fprintf(h, "%s\x00%s\x00%d\x00%s", r.Name, r.Region, len(r.Rule), r.Rule)
	}
	if len(rr.rules) > 0 {
		rr.ver = hex.EncodeToString(h.Sum(nil)[:12])
	}
	if ps.byRegion == nil {
		ps.byRegion = map[string]regionRules{}
	}
	ps.byRegion[region] = rr
	return rr.rules, rr.ver
}

// edgeRegion is the region of edge's directory record ("" before its first
// heartbeat or when it has none): the region its rules are chosen by.
func (s *Service) edgeRegion(edge string) string {
	e, err := s.state.Edge(edge)
	if err != nil {
		return ""
	}
	return e.Region
}

// sets returns the current policies and keys, read again only after the
// state changed either.
func (s *Service) sets() (*pullSets, error) {
	at := s.state.SetsIndex()
	s.setsMu.Lock()
	defer s.setsMu.Unlock()
	if s.pullSets != nil && s.pullSets.at == at {
		return s.pullSets, nil
	}
	ps := &pullSets{at: at}
	var err error
	if ps.policies, err = s.state.Policies(); err != nil {
		return nil, err
	}
	if ps.rules, err = s.state.Rules(); err != nil {
		return nil, err
	}
	if len(ps.policies) > 0 {
		h := sha256.New()
		for _, p := range ps.policies {
			fmt.Fprintf(h, "%s\x00%d\x00%s", p.Name, len(p.Rego), p.Rego)
		}
		ps.policiesVer = hex.EncodeToString(h.Sum(nil)[:12])
	}
	if jwks, err := s.KeySet(); err == nil {
		ps.keys = jwks
		sum := sha256.Sum256(jwks)
		ps.keysVer = hex.EncodeToString(sum[:12])
	} else if !errors.Is(err, ErrNotFound) {
		return nil, err
	}
	s.pullSets = ps
	return ps, nil
}

// touch records that edge is alive, without news of its backlog.
func (s *Service) touch(edge string, nowMs int64) {
	l := s.live
	l.mu.Lock()
	defer l.mu.Unlock()
	st := l.soft[edge]
	st.atMs = max(st.atMs, nowMs)
	l.soft[edge] = st
	l.update(edge, nowMs, s.cfg.HeartbeatFresh)
}

// Heartbeat records an edge's liveness and backlog in the leader's memory;
// only a change of its durable facts (region, location, advertise URL), or
// its first heartbeat, is proposed through raft. An empty h.Edge means
// edge. It also makes sure the deployment has a signing key, so that every
// edge trusts it (from its next pull) before the first phone logs in. Run
// on the leader: ErrNotLeader elsewhere.
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
	if !s.raft.IsLeader() {
		return wire.HeartbeatResult{}, ErrNotLeader
	}
	s.live.lead(true, s.cfg.Now().UnixMilli())
	if err := s.ensureSigningKey(ctx); err != nil {
		return wire.HeartbeatResult{}, err
	}
	now := s.cfg.Now()
	acked := s.state.EdgeSeq(edge)
	rec, err := s.state.Edge(edge)
	if err != nil && !errors.Is(err, fsm.ErrNotFound) {
		return wire.HeartbeatResult{}, err
	}
	if err != nil || !sameDurable(&rec, h) {
		res, err := s.propose(ctx, &fsm.Command{Type: fsm.CmdHeartbeat, Heartbeat: h})
		if err != nil {
			return wire.HeartbeatResult{}, err
		}
		acked = res.AckedSeq
		s.m.durableBeats.Inc()
		rec = wire.Edge{ID: edge, Region: h.Region, Location: h.Location, Advertise: h.Advertise, Backlog: h.Backlog,
			LastHeartbeatMs: now.UnixMilli(), AckedSeq: acked, OldestUnsynced: h.OldestUnsyncedMs}
	}
	l := s.live
	l.mu.Lock()
	if l.loaded {
		// The record as committed, so the entry is current now; the sweep
		// re-reads all records (at most once a second) since the state's
		// EdgesIndex moved.
		l.durable[edge] = rec
	}
	l.soft[edge] = softState{atMs: now.UnixMilli(), backlog: h.Backlog, oldestMs: h.OldestUnsyncedMs, beat: true}
	l.update(edge, now.UnixMilli(), s.cfg.HeartbeatFresh)
	l.mu.Unlock()
	s.m.backlog.WithLabelValues(edge).Set(float64(h.Backlog))
	return wire.HeartbeatResult{AckedSeq: acked, ServerTimeMs: now.UnixMilli()}, nil
}

// sameDurable reports whether a heartbeat repeats the durable facts of the
// edge's record.
func sameDurable(rec *wire.Edge, h *wire.Heartbeat) bool {
	if rec.Region != h.Region || rec.Advertise != h.Advertise || (rec.Location == nil) != (h.Location == nil) {
		return false
	}
	return rec.Location == nil || *rec.Location == *h.Location
}
