package main

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/outpost-edge/outpost/pkg/backoff"
	"github.com/outpost-edge/outpost/pkg/cloud/client"
	"github.com/outpost-edge/outpost/pkg/syncer"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// simEdge is one simulated edge: the loops of pkg/syncer (push, and pull
// with its heartbeat) over an in-memory outbox instead of a bbolt store.
//
// Why not pkg/syncer itself: it needs a *store.Store, and a real store per
// edge would make the simulator, not the cloud, the thing measured. The
// syncer writes its pull cursor and the pulled directory to the store after
// every pull (a bbolt transaction with an fsync), so 1,000 idle edges would
// fsync about 1,000 times a second on the disk the three cloud nodes use for
// their raft logs, and each store costs a file, a mapping and its own
// goroutines. What the cloud sees is the same: the edge's own client
// (pkg/cloud/client, built as pkg/edge builds it), the wire shapes, and the
// syncer's cadence and rules, with its defaults read from
// syncer.DefaultConfig: heartbeat when HeartbeatInterval has passed, then
// pull every page, the first a long-poll of PullWait with the set versions
// the edge holds (so an idle pull is held by the cloud and answered small),
// pausing PullInterval only after an empty pull the cloud did not hold;
// resume from the cloud's
// acknowledged sequence (a heartbeat) before pushing and after any failure
// or gap; up to InFlight pushes in flight, acknowledged in order; an idle
// outbox looked at every Idle; full-jitter backoff, and a 429's Retry-After
// (plus jitter) obeyed. Left out because the simulated edges have nothing
// for them: the state batch (/sync/v1/state; these edges make readings
// only) and applying pulled changes and sets to a store.
type simEdge struct {
	id, device string
	cl         *client.Client
	cfg        syncer.Config
	hb         wire.Heartbeat // the fixed part: id, region, location, advertise
	m          *meter

	mu        sync.Mutex
	outbox    []entry // sequences acked+1 … head, in order
	head      uint64  // last sequence made
	acked     uint64  // highest sequence the cloud acknowledged
	lastTS    int64
	target    uint64 // storm: the head to drain to; 0 when not draining
	drainedAt time.Time
	startedAt time.Time
	lagSince  time.Time       // zero: lags not recorded
	lags      []time.Duration // made → acknowledged, of readings made since lagSince

	pending atomic.Bool      // head > acked, read by the idle push loop without the lock
	ready   atomic.Bool      // a heartbeat and a pull succeeded since start
	cursor  string           // pull cursor; owned by the pull loop
	have    wire.SetVersions // set versions held; owned by the pull loop
}

type entry struct {
	seq  uint64
	made time.Time
	r    wire.Reading
}

func newSimEdge(i int, id string, urls []string, cfg syncer.Config, m *meter) (*simEdge, error) {
	// Edges spread over the nodes as behind a round-robin name: each lists
	// every node, starting at a different one.
	rot := append(append([]string(nil), urls[i%len(urls):]...), urls[:i%len(urls)]...)
	// As pkg/edge builds the client (two rounds over the nodes, then the
	// syncer's backoff), plus the meter's transport.
	cl, err := client.New(rot, edgeToken(id), client.WithRounds(2), client.WithHTTPClient(m.httpClient(30*time.Second)))
	if err != nil {
		return nil, err
	}
	e := &simEdge{id: id, device: "dev-" + id, cl: cl, cfg: cfg, m: m}
	e.hb = wire.Heartbeat{Edge: id, Region: fmt.Sprintf("region-%d", i%8),
		Location:  &wire.Location{Lat: 30 + float64(i%100)*0.01, Lng: 120 + float64(i/100)*0.01},
		Advertise: fmt.Sprintf("http://127.%d.%d.%d:8080", i>>16&255, i>>8&255, i&255+1)}
	return e, nil
}

// add makes n readings, one outbox entry each (one MQTT message of one
// reading becomes one outbox entry on a real edge).
func (e *simEdge) add(n int, now time.Time) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for k := 0; k < n; k++ {
		e.head++
		e.lastTS = max(e.lastTS+1, now.UnixMilli()) // unique per device: no duplicates
		e.outbox = append(e.outbox, entry{seq: e.head, made: now,
			r: wire.Reading{TS: e.lastTS, Metrics: map[string]float64{"temp": 21.5 + float64(k%10)/10, "hum": 40}}})
	}
	e.pending.Store(true)
}

// drainTo marks the storm: the edge is drained when the cloud acknowledged
// everything it holds now.
func (e *simEdge) drainTo() {
	e.mu.Lock()
	e.target, e.drainedAt = e.head, time.Time{}
	e.mu.Unlock()
}

func (e *simEdge) drained() (at, started time.Time, ok bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.drainedAt, e.startedAt, !e.drainedAt.IsZero()
}

// setLagSince records, from now on, the lag of every reading made at or
// after t (a storm's leftovers are not steady-state lag).
func (e *simEdge) setLagSince(t time.Time) {
	e.mu.Lock()
	e.lagSince = t
	e.mu.Unlock()
}

func (e *simEdge) takeLags() []time.Duration {
	e.mu.Lock()
	defer e.mu.Unlock()
	lags := e.lags
	e.lags = nil
	return lags
}

// ack records the cloud's acknowledgement of everything through seq.
func (e *simEdge) ack(seq uint64) {
	now := time.Now()
	e.mu.Lock()
	defer e.mu.Unlock()
	if seq <= e.acked {
		return
	}
	k := 0
	for k < len(e.outbox) && e.outbox[k].seq <= seq {
		if !e.lagSince.IsZero() && !e.outbox[k].made.Before(e.lagSince) {
			e.lags = append(e.lags, now.Sub(e.outbox[k].made))
		}
		k++
	}
	e.outbox = append(e.outbox[:0], e.outbox[k:]...)
	e.acked = seq
	e.pending.Store(e.acked < e.head)
	if e.target > 0 && e.acked >= e.target && e.drainedAt.IsZero() {
		e.drainedAt = now
	}
}

// run is the syncer's Run: the push and pull loops until ctx ends.
func (e *simEdge) run(ctx context.Context) {
	e.mu.Lock()
	e.startedAt = time.Now()
	e.mu.Unlock()
	e.ready.Store(false)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); e.pushLoop(ctx) }()
	go func() { defer wg.Done(); e.pullLoop(ctx) }()
	wg.Wait()
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// failed is the syncer's: a 429's Retry-After plus the syncer's jitter
// (syncer.ThrottleWait), else the next backoff.
func (e *simEdge) failed(ctx context.Context, err error, bo *backoff.Backoff) time.Duration {
	var th *client.ThrottledError
	if errors.As(err, &th) {
		return syncer.ThrottleWait(th.RetryAfter)
	}
	if ctx.Err() == nil {
		e.m.fail(fmt.Errorf("edge %s: %w", e.id, err))
	}
	return bo.Next()
}

// ---- push (syncer.pushLoop, pushWindow, resume) ----

func (e *simEdge) pushLoop(ctx context.Context) {
	bo := backoff.Backoff{Base: e.cfg.BackoffBase, Max: e.cfg.BackoffMax}
	synced := false
	idle := time.NewTicker(e.cfg.Idle)
	defer idle.Stop()
	for ctx.Err() == nil {
		if !synced {
			if err := e.resume(ctx); err != nil {
				if ctx.Err() == nil && !sleep(ctx, e.failed(ctx, err, &bo)) {
					return
				}
				continue
			}
			synced = true
		}
		n, err := e.pushWindow(ctx, e.cfg.InFlight)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			var gap *client.GapError
			if errors.As(err, &gap) {
				synced = false
				continue
			}
			if !sleep(ctx, e.failed(ctx, err, &bo)) {
				return
			}
			synced = false
			continue
		}
		bo.Reset()
		if n > 0 {
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-idle.C:
		}
	}
}

// resume asks the cloud for its acknowledged sequence, as the syncer does
// before pushing.
func (e *simEdge) resume(ctx context.Context) error {
	res, err := e.heartbeat(ctx)
	if err != nil {
		return err
	}
	e.mu.Lock()
	head := e.head
	e.mu.Unlock()
	if res.AckedSeq > head {
		return fmt.Errorf("cloud acknowledged sequence %d of edge %s, beyond its head %d: is the cluster fresh?", res.AckedSeq, e.id, head)
	}
	e.ack(res.AckedSeq)
	return nil
}

func (e *simEdge) heartbeat(ctx context.Context) (*wire.HeartbeatResult, error) {
	return e.cl.Heartbeat(ctx, e.heartbeatBody())
}

// heartbeatBody is what the edge's heartbeat says now.
func (e *simEdge) heartbeatBody() *wire.Heartbeat {
	h := e.hb
	e.mu.Lock()
	h.Backlog = e.head - e.acked
	if len(e.outbox) > 0 {
		h.OldestUnsyncedMs = e.outbox[0].made.UnixMilli()
	}
	e.mu.Unlock()
	return &h
}

// batch is the next push after sequence after, cut as the syncer cuts it:
// at most wire.MaxBatchChanges changes and BatchReadings (and
// wire.MaxReadingsTotal) readings; nil when nothing is left. (The syncer's
// BatchBytes bound, 4 MiB of encoded entries, cannot bind first here:
// 20,000 one-reading entries encode to about 1.5 MB.)
func (e *simEdge) batch(after uint64) *wire.PushBatch {
	e.mu.Lock()
	defer e.mu.Unlock()
	if after >= e.head || len(e.outbox) == 0 {
		return nil
	}
	i := int(after + 1 - e.outbox[0].seq)
	if i < 0 || i >= len(e.outbox) {
		return nil
	}
	limit := min(wire.MaxBatchChanges, e.cfg.BatchReadings, wire.MaxReadingsTotal)
	j := min(len(e.outbox), i+limit)
	b := &wire.PushBatch{Edge: e.id, FirstSeq: e.outbox[i].seq, Changes: make([]wire.Change, 0, j-i)}
	for k := i; k < j; k++ {
		b.Changes = append(b.Changes, wire.Change{Kind: wire.KindReadings, Device: e.device, Readings: []wire.Reading{e.outbox[k].r}})
	}
	return b
}

type flight struct {
	b    *wire.PushBatch
	done chan flightResult
}

type flightResult struct {
	res *wire.PushResult
	err error
}

// pushWindow drains the outbox with up to window pushes in flight, taking
// acknowledgements in order; it returns how many changes were acknowledged
// and the first error.
func (e *simEdge) pushWindow(ctx context.Context, window int) (int, error) {
	if !e.pending.Load() {
		return 0, nil
	}
	e.mu.Lock()
	next := e.acked
	e.mu.Unlock()
	var q []*flight
	var firstErr error
	sent := 0
	for {
		for len(q) < window && firstErr == nil && ctx.Err() == nil {
			b := e.batch(next)
			if b == nil {
				break
			}
			f := &flight{b: b, done: make(chan flightResult, 1)}
			go func() {
				res, err := e.cl.Push(ctx, f.b)
				f.done <- flightResult{res, err}
			}()
			q = append(q, f)
			next = b.LastSeq()
		}
		if len(q) == 0 {
			break
		}
		f := q[0]
		q = q[1:]
		r := <-f.done
		if r.err != nil {
			if firstErr == nil {
				firstErr = r.err
			}
			continue
		}
		e.ack(r.res.AckedSeq)
		sent += len(f.b.Changes)
	}
	return sent, firstErr
}

// ---- pull (syncer.pullLoop, pull) ----

func (e *simEdge) pullLoop(ctx context.Context) {
	bo := backoff.Backoff{Base: e.cfg.BackoffBase, Max: e.cfg.BackoffMax}
	lastBeat := time.Time{}
	var said wire.Heartbeat
	for ctx.Err() == nil {
		var err error
		if h := e.heartbeatBody(); e.cfg.HeartbeatDue(time.Since(lastBeat), syncer.SameHeartbeat(h, &said)) {
			if _, err = e.cl.Heartbeat(ctx, h); err == nil {
				lastBeat, said = time.Now(), *h
			}
		}
		start := time.Now()
		held := false
		if err == nil {
			held, err = e.pull(ctx)
		}
		var wait time.Duration
		switch {
		case err != nil:
			if ctx.Err() != nil {
				return
			}
			wait = e.failed(ctx, err, &bo)
		case !held && time.Since(start) < e.cfg.PullWait/2:
			bo.Reset()
			e.ready.Store(true)
			wait = e.cfg.PullInterval
		default:
			bo.Reset()
			e.ready.Store(true)
		}
		if wait > 0 && !sleep(ctx, wait) {
			return
		}
	}
}

// pull fetches every page after the cursor, as the syncer does, keeping
// the set versions the pages report; what the pages carry is dropped (a
// real edge stores it).
func (e *simEdge) pull(ctx context.Context) (held bool, err error) {
	wait := e.cfg.PullWait
	for page := 0; page < 1000; page++ {
		sent := time.Now()
		p, err := e.cl.PullSets(ctx, e.cursor, 1000, e.have, wait)
		var apiErr *client.APIError
		if errors.As(err, &apiErr) && apiErr.Status == 400 && e.cursor != "" {
			e.cursor, e.have = "", wire.SetVersions{}
			continue
		}
		if err != nil {
			return held, err
		}
		if len(p.Changes) > 0 || p.Versions != nil && *p.Versions != e.have || time.Since(sent) >= wait/2 {
			held = true
		}
		wait = 0
		e.cursor = p.NextCursor
		if p.Versions != nil {
			e.have = *p.Versions
		}
		if !p.More {
			return held, nil
		}
	}
	return held, nil
}
