package service

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Liveness and the edge directory, off raft.
//
// Heartbeats are soft state, kept in the leader's memory (followers forward
// them, and pulls, which also count as liveness, to the leader); only the
// durable facts of an edge (region, location, advertise URL) go through
// raft, and only when they change. The directory an edge pulls and the
// consumer API serves is the durable records overlaid with that soft state:
// health (a heartbeat or pull within HeartbeatFresh), backlog and lag.
//
// The directory's version is the leader's: an epoch drawn when this node
// became leader and a sequence. An entry's version moves when what edges
// see of it changes materially (a durable fact, health, or the magnitude
// class of its backlog or lag; a fresh heartbeat that changes none of those
// does not), so a delta carries only the entries that changed. Held pulls
// are woken, at most once per sweep (a second), for a change of an entry's
// durable facts or health, or an entry added or removed. A change of only
// the backlog or lag class wakes no pull, nor ends one that comes after it
// at once (delta): held pulls end within PullHold anyway and bring it
// then. Under a reconnect storm every edge's backlog class moves, and
// waking every held pull each second for that made a thousand pulls a
// second.
//
// After a failover the new leader has no soft state: for HeartbeatFresh it
// treats every edge it has not heard from as healthy (health unknown, the
// benefit of the doubt, as the old leader most likely saw it), with the
// backlog and lag of its durable record. Edges heartbeat and pull well
// within that window, so by its end every live edge has soft state again;
// its epoch is new, so every edge gets the whole directory once.

// softState is what the last heartbeat (or pull) of an edge said.
type softState struct {
	atMs     int64
	backlog  uint64
	oldestMs int64
	beat     bool // a heartbeat, not only a pull, was seen: backlog is known
}

type dirEntry struct {
	edge wire.Edge
	fp   entryFP // durable facts and health
	load [2]byte // backlog and lag classes
	ver  uint64
}

type liveness struct {
	mu          sync.Mutex
	leading     bool
	leaderSince int64 // ms
	epoch       string
	seq         uint64
	woke        uint64 // seq at the last wake
	urgentSeq   uint64 // seq of the last change that wakes held pulls (see above): woken at a sweep while past woke; an older pull returns at once
	wakeCh      chan struct{}
	soft        map[string]softState
	durable     map[string]wire.Edge
	durableAt   uint64 // the state's EdgesIndex the durable records were read at
	loaded      bool
	entries     map[string]*dirEntry
	removed     map[string]uint64
	// flipAt is the earliest time (ms) an entry's health can change by
	// time passing alone (a healthy edge falling silent past
	// HeartbeatFresh, or the end of a new leader's benefit of the doubt);
	// 0 is now. Everything else an entry shows changes with an event
	// (heartbeat, pull, durable write) that updates it then, so the
	// sweep recomputes the entries only from flipAt on: a thousand idle
	// edges cost it nothing most seconds.
	flipAt int64
	// observed pull positions, and the ones recorded in raft (or found
	// there), by edge.
	observed map[string]string
	recorded map[string]string
	// deltas memoises delta's answers for the version deltasAt: the
	// edges woken by one directory change all hold the same version and
	// pull the same delta, a scan and sort of the whole directory each.
	// Values that moved without moving the version (not material, see
	// update) are as of the memo's first answer, not of each pull.
	deltas   map[string]*wire.DirectoryDelta
	deltasAt string
}

// maxDeltaMemo bounds the memo: edges hold only a few versions at a time,
// and a full delta is the whole directory.
const maxDeltaMemo = 16

func newLiveness() *liveness {
	return &liveness{wakeCh: make(chan struct{}), soft: map[string]softState{}, entries: map[string]*dirEntry{},
		removed: map[string]uint64{}, observed: map[string]string{}, recorded: map[string]string{}}
}

// lead starts or ends this node's term as the directory's keeper: a new
// term forgets soft state (heard while a follower, it is stale) and draws a
// new epoch.
func (l *liveness) lead(leading bool, nowMs int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if leading == l.leading {
		return
	}
	l.leading = leading
	if leading {
		var b [6]byte
		_, _ = rand.Read(b[:])
		l.epoch = base64.RawURLEncoding.EncodeToString(b[:])
		l.leaderSince = nowMs
		l.seq, l.woke, l.urgentSeq = 0, 0, 0
		l.soft = map[string]softState{}
		l.entries = map[string]*dirEntry{}
		l.removed = map[string]uint64{}
		l.observed = map[string]string{}
		l.recorded = map[string]string{}
		l.loaded = false
		l.flipAt = 0
	}
	// Held pulls return: on a follower they should find the new leader.
	close(l.wakeCh)
	l.wakeCh = make(chan struct{})
}

// watch returns a channel closed at the next sweep after a change that
// wakes held pulls (durable facts, health, an entry added or removed; see
// the package comment), or when leadership changes.
func (l *liveness) watch() <-chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.wakeCh
}

// served is the entry edges see for a durable record, with the soft state
// laid over it. Call with mu held.
func (l *liveness) served(d wire.Edge, nowMs int64, fresh time.Duration) wire.Edge {
	e := d
	if s, ok := l.soft[d.ID]; ok {
		e.LastHeartbeatMs = max(e.LastHeartbeatMs, s.atMs)
		if s.beat {
			e.Backlog, e.OldestUnsynced = s.backlog, s.oldestMs
		}
		e.Healthy = s.atMs >= nowMs-fresh.Milliseconds()
	} else {
		e.Healthy = l.leading && nowMs < l.leaderSince+fresh.Milliseconds()
	}
	e.LagMs = 0
	if e.OldestUnsynced > 0 {
		e.LagMs = max(e.LastHeartbeatMs-e.OldestUnsynced, 0)
	}
	return e
}

// fingerprint is what of an entry counts as a directory change: the
// durable facts and health, and (load) the magnitude of backlog and lag.
// It is comparable, so the sweep, which recomputes every entry each
// second, compares without building anything.
func fingerprint(e *wire.Edge) (fp entryFP, load [2]byte) {
	fp = entryFP{region: e.Region, advertise: e.Advertise, healthy: e.Healthy}
	if e.Location != nil {
		// Bits, not floats: a NaN would otherwise differ from itself and
		// count as a change at every sweep.
		fp.located, fp.lat, fp.lng = true, math.Float64bits(e.Location.Lat), math.Float64bits(e.Location.Lng)
	}
	return fp, [2]byte{byte(backlogClass(e.Backlog)), byte(lagClass(e.LagMs))}
}

type entryFP struct {
	region, advertise string
	located           bool
	lat, lng          uint64
	healthy           bool
}

// backlogClass: 0, under 1,000, under 100,000, more.
func backlogClass(n uint64) int {
	switch {
	case n == 0:
		return 0
	case n < 1000:
		return 1
	case n < 100000:
		return 2
	}
	return 3
}

// lagClass: in sync, under 10 s, under 5 min, more.
func lagClass(ms int64) int {
	switch {
	case ms <= 0:
		return 0
	case ms < 10_000:
		return 1
	case ms < 300_000:
		return 2
	}
	return 3
}

// update recomputes one entry; mu held.
func (l *liveness) update(id string, nowMs int64, fresh time.Duration) {
	d, ok := l.durable[id]
	if !ok {
		return
	}
	e := l.served(d, nowMs, fresh)
	if e.Healthy {
		flip := l.leaderSince + fresh.Milliseconds() // served: healthy while before it
		if s, ok := l.soft[id]; ok {
			flip = s.atMs + fresh.Milliseconds() + 1 // healthy up to and at atMs+fresh
		}
		l.flipAt = min(l.flipAt, flip)
	}
	fp, load := fingerprint(&e)
	cur := l.entries[id]
	switch {
	case cur == nil:
		l.seq++
		l.urgentSeq = l.seq
		l.entries[id] = &dirEntry{edge: e, fp: fp, load: load, ver: l.seq}
		delete(l.removed, id)
	case cur.fp != fp || cur.load != load:
		l.seq++
		if cur.fp != fp {
			l.urgentSeq = l.seq
		}
		cur.edge, cur.fp, cur.load, cur.ver = e, fp, load, l.seq
	default:
		cur.edge = e // the newest values ride along with the next change
	}
}

// version is the directory's current version; mu held.
func (l *liveness) version() string { return l.epoch + "." + strconv.FormatUint(l.seq, 10) }

// delta is the directory change since have (the whole directory when have
// is not of this epoch), with the current version. urgent reports that the
// change is one that wakes held pulls (a durable fact, health, an entry
// added or removed, or a whole directory): a pull that brings only a
// backlog or lag class change is held like an empty one and carries the
// delta when it ends. Otherwise, under a reconnect storm, where some edge's
// backlog class moves every moment, every pull would find the directory
// moved since its last one and return at once, and edges would pull back
// to back (ten to forty pulls each in a 1,000-edge storm, instead of two).
// Call after refresh.
func (l *liveness) delta(have string) (d *wire.DirectoryDelta, ver string, urgent bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	ver = l.version()
	if have == ver {
		return nil, ver, false
	}
	var since uint64
	ep, n, ok := strings.Cut(have, ".")
	s, err := strconv.ParseUint(n, 10, 64)
	known := ok && err == nil && ep == l.epoch && s <= l.seq
	if known {
		since = s
	}
	urgent = !known || since < l.urgentSeq
	if l.deltasAt != ver {
		l.deltas, l.deltasAt = map[string]*wire.DirectoryDelta{}, ver
	}
	if d, ok := l.deltas[have]; ok {
		return d, ver, urgent // shared: callers only encode it
	}
	d = &wire.DirectoryDelta{Full: !known}
	for _, e := range l.entries {
		if d.Full || e.ver > since {
			d.Edges = append(d.Edges, e.edge)
		}
	}
	if !d.Full {
		for id, v := range l.removed {
			if v > since {
				d.Removed = append(d.Removed, id)
			}
		}
		slices.Sort(d.Removed)
	}
	wire.SortEdges(d.Edges)
	if len(l.deltas) < maxDeltaMemo {
		l.deltas[have] = d
	}
	return d, ver, urgent
}

// all is the whole directory as last refreshed.
func (l *liveness) all() []wire.Edge {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]wire.Edge, 0, len(l.entries))
	for _, e := range l.entries {
		out = append(out, e.edge)
	}
	wire.SortEdges(out)
	return out
}

// observe records the position an edge pulled from.
func (l *liveness) observe(edge, cursor string, recorded func() string) {
	if cursor == "" {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.observed[edge] == cursor {
		return
	}
	if _, ok := l.recorded[edge]; !ok {
		l.mu.Unlock()
		r := recorded()
		l.mu.Lock()
		l.recorded[edge] = r
	}
	if !cursorAfter(cursor, l.observed[edge]) {
		return
	}
	l.observed[edge] = cursor
}

// pendingAcks are the observed positions not yet recorded in raft.
func (l *liveness) pendingAcks() map[string]string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out map[string]string
	for e, c := range l.observed {
		if cursorAfter(c, l.recorded[e]) {
			if out == nil {
				out = map[string]string{}
			}
			out[e] = c
		}
	}
	return out
}

func (l *liveness) acked(acks map[string]string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for e, c := range acks {
		if cursorAfter(c, l.recorded[e]) {
			l.recorded[e] = c
		}
	}
}

// cursorAfter reports whether pull cursor a is past b ("" is the start).
// Cursors encode big-endian positions of one length, so their decoded
// bytes compare in order; an undecodable one is never after.
func cursorAfter(a, b string) bool {
	ka, err := base64.RawURLEncoding.DecodeString(a)
	if err != nil || len(ka) == 0 {
		return false
	}
	if b == "" {
		return true
	}
	kb, err := base64.RawURLEncoding.DecodeString(b)
	if err != nil {
		return true
	}
	return bytes.Compare(ka, kb) > 0
}

// refreshDirectory reads the durable records when this leader has none
// yet, and with sweep also when the state changed any since the last read;
// then (or with sweep) it recomputes every entry (health flips with time).
// Between sweeps, Heartbeat keeps the records it writes current itself, so
// a fleet registering costs one read of the records a second, not one per
// edge. Leader only.
func (s *Service) refreshDirectory(nowMs int64, sweep bool) error {
	l := s.live
	all := sweep
	idx := s.state.EdgesIndex()
	l.mu.Lock()
	stale := !l.loaded || sweep && idx != l.durableAt
	l.mu.Unlock()
	var recs []wire.Edge
	if stale {
		var err error
		if recs, err = s.state.Edges(); err != nil {
			return err
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if stale {
		l.durable = make(map[string]wire.Edge, len(recs))
		for _, r := range recs {
			l.durable[r.ID] = r
		}
		l.durableAt, l.loaded = idx, true
		for id := range l.entries {
			if _, ok := l.durable[id]; !ok {
				delete(l.entries, id)
				l.seq++
				l.urgentSeq = l.seq
				l.removed[id] = l.seq
			}
		}
	}
	if stale || all && nowMs >= l.flipAt {
		l.flipAt = math.MaxInt64
		for id := range l.durable {
			l.update(id, nowMs, s.cfg.HeartbeatFresh)
		}
	}
	return nil
}

// sweep is the liveness loop's tick: follow leadership, refresh the
// directory, and wake held pulls if its version moved.
func (s *Service) sweep() {
	now := s.cfg.Now().UnixMilli()
	leading := s.raft.IsLeader()
	s.live.lead(leading, now)
	if !leading {
		return
	}
	if err := s.refreshDirectory(now, true); err != nil {
		s.log.Warn("edge directory refresh failed", "err", err)
		return
	}
	l := s.live
	l.mu.Lock()
	if l.urgentSeq > l.woke {
		l.woke = l.seq
		close(l.wakeCh)
		l.wakeCh = make(chan struct{})
	}
	l.mu.Unlock()
}

// flushPullAcks records the pull positions the leader observed since the
// last flush, in one command.
func (s *Service) flushPullAcks(ctx context.Context) {
	if !s.raft.IsLeader() {
		return
	}
	acks := s.live.pendingAcks()
	if len(acks) == 0 {
		return
	}
	res, err := s.propose(ctx, &fsm.Command{Type: fsm.CmdPullAcks,
		PullAcks: &fsm.PullAcks{Edges: acks, MaxOfflineMs: s.cfg.MaxOffline.Milliseconds()}})
	if err != nil {
		if ctx.Err() == nil {
			s.log.Warn("recording pull positions failed; retrying next round", "err", err)
		}
		return
	}
	s.live.acked(acks)
	if res.Applied > 0 {
		s.log.Debug("deleted pulled downlink entries", "entries", res.Applied)
	}
}

// RunLiveness keeps the directory (health flips with time, leadership
// changes) and records edges' pull positions every PullAckInterval while
// this node leads, until ctx ends.
func (s *Service) RunLiveness(ctx context.Context) {
	t := time.NewTicker(s.cfg.LivenessInterval)
	defer t.Stop()
	var lastAck time.Time
	for {
		s.sweep()
		if time.Since(lastAck) >= s.cfg.PullAckInterval {
			s.flushPullAcks(ctx)
			lastAck = time.Now()
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
