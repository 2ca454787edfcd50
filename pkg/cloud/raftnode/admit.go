package raftnode

import (
	"context"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// Admission control. A sync write is admitted before its body is decoded
// (Admit), and admission keeps the apply queue (proposals queued or in
// flight, PendingBytes) full enough to keep raft and the state machine busy
// but never longer than MaxQueueDelay at the rate it drains, and never over
// MaxPendingBytes: a write is admitted only if its room fits in what the
// queue may hold now, or the queue is empty. A write that finds no room
// waits for it, in arrival order, for at most AdmitWait; only when the wait
// would be longer (judged from the drain rate), or the waiting room
// (MaxWaitingBytes of request bodies) is full, is it refused at once, with
// an *OverloadError and a Retry-After of a second: it comes back soon and
// waits in the room that will have formed. Under a reconnect storm the
// cluster so commits at its own pace, and edges are served about in the
// order they came. (Telling each refused write its own later turn, from
// the drain rate, left the cluster 40 % idle in a 1,000-edge storm: the
// estimate erred late, and the storm took 73 s instead of 33.)
//
// Room is reserved by the body's size times the ratio of command to body
// size seen so far (starting high, at initialExpansion: a zstd body decodes
// to several times its size), and the reservation becomes the command's
// own size once it is queued. Memory bound per node: the queue (at most
// MaxPendingBytes, or one write larger than that, plus any underestimate of
// the writes being decoded) and the bodies waiting for room (at most
// MaxWaitingBytes). An admitted write's decoded form lives only from its
// decoding to its place in the queue.

// OverloadError is ErrOverloaded with how long the caller should wait.
type OverloadError struct {
	// RetryAfter is 1 s for a write refused at once; otherwise when the
	// queue is expected to have room for the caller (at least a second).
	RetryAfter time.Duration
	Reason     string
	cause      error
}

func (e *OverloadError) Error() string {
	return fmt.Sprintf("%s: %s; retry after %s", ErrOverloaded, e.Reason, e.RetryAfter)
}

// Is makes an *OverloadError match ErrOverloaded.
func (e *OverloadError) Is(target error) bool { return target == ErrOverloaded }

// Unwrap is the cause, if any (the context's error for a proposal that
// expired in the queue).
func (e *OverloadError) Unwrap() error { return e.cause }

// admission is the waiting room: writes waiting for room in the queue, in
// arrival order.
type admission struct {
	mu       sync.Mutex
	queue    []*waiter
	waiting  int64 // body bytes of queue
	reserved int64 // reservations of queue
}

type waiter struct {
	size, reserve int64
	ready         chan struct{} // closed once admitted
	admitted      bool          // guarded by admission.mu
}

// reservation is an admitted write's room in the queue, held until its
// proposal takes its place there (ProposeOrdered) or the request ends.
type reservation struct {
	n     *Node
	body  int64 // the request body's size
	bytes int64
	done  atomic.Bool
}

func (r *reservation) release() {
	if r.done.CompareAndSwap(false, true) {
		r.n.pending.Add(-r.bytes)
		r.n.admitNext()
	}
}

type reservationKey struct{}

// queueLimit is how much the queue may hold now: MaxQueueDelay's worth at
// the measured drain rate, at least minQueue, at most MaxPendingBytes.
func (n *Node) queueLimit() int64 {
	limit := n.cfg.MaxPendingBytes
	if n.cfg.MaxQueueDelay > 0 {
		floor := min(limit, int64(4*n.cfg.MaxEntryBytes))
		limit = max(floor, min(limit, int64(n.rate.bytesPerSec()*n.cfg.MaxQueueDelay.Seconds())))
	}
	return limit
}

// Admit admits a write of size body bytes from writer (an edge; "" for
// anyone else) into the apply queue, waiting for
// room as described above. It returns the context to propose the write
// with, which carries its reservation (ProposeOrdered turns it into the
// command's own size), and a release func the caller must call when the
// request ends (it is safe to call more than once, and after the proposal
// took over). Errors: ErrNotLeader, an *OverloadError.
func (n *Node) Admit(ctx context.Context, writer string, size int) (context.Context, func(), error) {
	if !n.IsLeader() {
		return ctx, func() {}, ErrNotLeader
	}
	sz := int64(size)
	// A quarter over the mean: bodies of one size vary in what they decode to.
	reserve := max(1, int64(float64(sz)*n.expansion()*1.25))
	a := &n.adm
	a.mu.Lock()
	if len(a.queue) == 0 && n.fits(reserve) {
		n.pending.Add(reserve)
		a.mu.Unlock()
		return n.reserved(ctx, sz, reserve)
	}
	if n.cfg.AdmitWait <= 0 || a.waiting+sz > n.cfg.MaxWaitingBytes {
		a.mu.Unlock()
		n.refused(writer)
		return ctx, func() {}, &OverloadError{RetryAfter: refusedRetry, Reason: "the apply queue and its waiting room are full"}
	}
	if turn := n.turnIn(a.reserved + reserve); turn > n.cfg.AdmitWait {
		// Waiting would only hold the body to refuse it later.
		a.mu.Unlock()
		n.refused(writer)
		return ctx, func() {}, &OverloadError{RetryAfter: refusedRetry,
			Reason: "the apply queue would not have room within the admission wait"}
	}
	w := &waiter{size: sz, reserve: reserve, ready: make(chan struct{})}
	a.queue = append(a.queue, w)
	a.waiting += sz
	a.reserved += reserve
	a.mu.Unlock()
	start := time.Now()
	t := time.NewTimer(n.cfg.AdmitWait)
	defer t.Stop()
	var cause error
	select {
	case <-w.ready:
	case <-t.C:
	case <-ctx.Done():
		cause = ctx.Err()
	case <-n.stop:
		cause = ErrStopped
	}
	a.mu.Lock()
	if w.admitted {
		a.mu.Unlock()
		n.metrics.admitWait.Observe(time.Since(start).Seconds())
		n.metrics.admissions.WithLabelValues("waited").Inc()
		return n.reserved(ctx, sz, reserve)
	}
	for i, q := range a.queue {
		if q == w {
			a.queue = append(a.queue[:i], a.queue[i+1:]...)
			break
		}
	}
	a.waiting -= sz
	a.reserved -= reserve
	wait := n.retryAfter(a.reserved + reserve)
	a.mu.Unlock()
	if cause == ErrStopped {
		return ctx, func() {}, ErrStopped
	}
	n.metrics.admissions.WithLabelValues("timed_out").Inc()
	return ctx, func() {}, &OverloadError{RetryAfter: wait, cause: cause,
		Reason: "the apply queue had no room within the admission wait"}
}

func (n *Node) reserved(ctx context.Context, body, bytes int64) (context.Context, func(), error) {
	r := &reservation{n: n, body: body, bytes: bytes}
	return context.WithValue(ctx, reservationKey{}, r), r.release, nil
}

// initialExpansion is the ratio of command to body size assumed before any
// was seen: zstd bodies of readings decode to about ten times their size,
// and the binary command is a little smaller than the JSON.
const initialExpansion = 16

// expansion is the running mean ratio of a command's size to its body's.
func (n *Node) expansion() float64 {
	if b := n.expand.Load(); b != 0 {
		return math.Float64frombits(b)
	}
	return initialExpansion
}

// takeReservation releases the reservation ctx carries, if any, once the
// proposal's own size (cmd bytes) counts in the queue, and learns the
// ratio of command to body size from it.
func (n *Node) takeReservation(ctx context.Context, cmd int) {
	r, ok := ctx.Value(reservationKey{}).(*reservation)
	if !ok || r.done.Load() {
		return
	}
	if r.body > 0 {
		// A racy running mean is good enough for a reservation's size.
		ratio := min(max(float64(cmd)/float64(r.body), 0.1), 64)
		n.expand.Store(math.Float64bits(n.expansion() + (ratio-n.expansion())/8))
	}
	r.release()
}

// admitNext admits waiters, first come first served, while the queue has
// room. Everything that lowers PendingBytes calls it.
func (n *Node) admitNext() {
	a := &n.adm
	a.mu.Lock()
	defer a.mu.Unlock()
	for len(a.queue) > 0 && n.fits(a.queue[0].reserve) {
		w := a.queue[0]
		a.queue[0] = nil
		a.queue = a.queue[1:]
		a.waiting -= w.size
		a.reserved -= w.reserve
		n.pending.Add(w.reserve)
		w.admitted = true
		close(w.ready)
	}
}

// fits reports whether the queue has room for bytes more; an empty queue
// takes any write, however large.
func (n *Node) fits(bytes int64) bool {
	p := n.pending.Load()
	return p == 0 || p+bytes <= n.queueLimit()
}

// turnIn is how long, at the drain rate, until the queue has room for
// ahead more bytes after what it holds (0 while the rate is unknown: the
// caller waits and sees).
func (n *Node) turnIn(ahead int64) time.Duration {
	rate := n.rate.bytesPerSec()
	if rate <= 0 {
		return 0
	}
	over := n.pending.Load() + ahead - n.queueLimit()
	if over <= 0 {
		return 0
	}
	return time.Duration(float64(over) / rate * float64(time.Second))
}

// refusedRetry is the Retry-After of a write refused at once (see above).
const refusedRetry = time.Second

func (n *Node) refused(writer string) {
	n.metrics.admissions.WithLabelValues("refused").Inc()
	n.log.Debug("write refused: apply queue full", "writer", writer)
}

// retryAfter is the Retry-After for a write refused with ahead bytes
// (waiters before it, and its own room) still to fit in the queue: when the
// queue should have room for them at its drain rate, at least a second, at
// most a minute.
func (n *Node) retryAfter(ahead int64) time.Duration {
	return min(max(n.turnIn(ahead), time.Second), time.Minute)
}

// drainRate measures how fast the queue drains (bytes of applied entries
// per second), over busy periods only: after a pause of more than
// rateIdle the next entry starts a new measurement. completeLoop is its
// only writer.
type drainRate struct {
	bits  atomic.Uint64 // float64 bytes/s
	start time.Time     // of the current measurement
	last  time.Time     // the previous entry's completion
	acc   int64         // bytes since start
}

const (
	rateIdle   = 2 * time.Second
	rateWindow = 500 * time.Millisecond
)

func (r *drainRate) bytesPerSec() float64 { return math.Float64frombits(r.bits.Load()) }

func (r *drainRate) observe(bytes int64, now time.Time) {
	if r.last.IsZero() || now.Sub(r.last) > rateIdle {
		r.start, r.acc = now, 0
	}
	r.last = now
	r.acc += bytes
	if el := now.Sub(r.start); el >= rateWindow {
		cur := float64(r.acc) / el.Seconds()
		if prev := r.bytesPerSec(); prev > 0 {
			cur = 0.5*prev + 0.5*cur
		}
		r.bits.Store(math.Float64bits(cur))
		r.start, r.acc = now, 0
	}
}
