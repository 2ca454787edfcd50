// Package authlimit throttles failed authentication per client address.
//
// Every address that fails gets a token bucket of failures: Rate per second,
// a burst of twice that. While an address's bucket is empty its requests are
// refused before their credential is even checked, so online guessing runs
// at the refill rate whatever the attacker's bandwidth, and a failing client
// costs no verification work. Successful requests take nothing from the
// bucket: a client that authenticates never notices the limiter.
//
// The table of addresses is bounded: past MaxAddrs the address that failed
// longest ago is forgotten first, so a flood of addresses costs bounded
// memory (and an attacker who owns that many addresses was never limited by
// a per-address throttle anyway).
package authlimit

import (
	"container/list"
	"sync"
	"time"
)

// DefaultMaxAddrs bounds the table when Config.MaxAddrs is 0.
const DefaultMaxAddrs = 10000

// Config configures a Limiter.
type Config struct {
	// Rate is the failures per second an address may sustain (its burst
	// is twice that). 0 or less disables the limiter.
	Rate float64
	// MaxAddrs bounds how many addresses are tracked (default
	// DefaultMaxAddrs).
	MaxAddrs int
	// Now is the clock (default time.Now); tests pass their own.
	Now func() time.Time
}

// Limiter is safe for concurrent use. A nil *Limiter allows everything.
type Limiter struct {
	rate, burst float64
	max         int
	now         func() time.Time

	mu    sync.Mutex
	addrs map[string]*list.Element // of *bucket
	lru   list.List                // front: most recent failure
}

type bucket struct {
	addr   string
	tokens float64
	last   time.Time
}

// New returns a limiter, or nil (allow everything) when cfg.Rate ≤ 0.
func New(cfg Config) *Limiter {
	if cfg.Rate <= 0 {
		return nil
	}
	if cfg.MaxAddrs <= 0 {
		cfg.MaxAddrs = DefaultMaxAddrs
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Limiter{rate: cfg.Rate, burst: 2 * cfg.Rate, max: cfg.MaxAddrs, now: cfg.Now,
		addrs: map[string]*list.Element{}}
}

// refill brings b up to date at now.
func (l *Limiter) refill(b *bucket, now time.Time) {
	if dt := now.Sub(b.last).Seconds(); dt > 0 {
		b.tokens = min(l.burst, b.tokens+dt*l.rate)
	}
	b.last = now
}

// Allow reports whether addr may try to authenticate now; when it may not,
// wait is how long until its next attempt would be allowed (for
// Retry-After).
func (l *Limiter) Allow(addr string) (wait time.Duration, ok bool) {
	if l == nil {
		return 0, true
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	e, found := l.addrs[addr]
	if !found {
		return 0, true
	}
	b := e.Value.(*bucket)
	l.refill(b, l.now())
	if b.tokens >= 1 {
		return 0, true
	}
	return time.Duration((1 - b.tokens) / l.rate * float64(time.Second)), false
}

// Fail records a failed authentication from addr.
func (l *Limiter) Fail(addr string) {
	if l == nil {
		return
	}
	now := l.now()
	l.mu.Lock()
	defer l.mu.Unlock()
	e, found := l.addrs[addr]
	if !found {
		if len(l.addrs) >= l.max {
			oldest := l.lru.Back()
			delete(l.addrs, oldest.Value.(*bucket).addr)
			l.lru.Remove(oldest)
		}
		e = l.lru.PushFront(&bucket{addr: addr, tokens: l.burst, last: now})
		l.addrs[addr] = e
	}
	b := e.Value.(*bucket)
	l.refill(b, now)
	// Floor at zero: concurrent failures that all passed Allow do not
	// lock the address out for longer than one empty bucket.
	b.tokens = max(0, b.tokens-1)
	l.lru.MoveToFront(e)
}

// Len is the number of addresses tracked (for tests and metrics).
func (l *Limiter) Len() int {
	if l == nil {
		return 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.addrs)
}
