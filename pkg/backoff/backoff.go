// Package backoff provides capped exponential backoff with full jitter: the
// wait after the n-th consecutive failure is uniform in
// [0, min(Max, Base·2^n)), plus a millisecond so that no wait is zero. Full
// jitter spreads out the retries of many clients that failed together (a
// restarted cloud, a flapping link) instead of bunching them at the same
// instants.
package backoff

import (
	"math/rand/v2"
	"time"
)

// Backoff is one retry loop's state; the zero value of the counter is the
// first attempt. It is not safe for concurrent use: each loop owns one.
type Backoff struct {
	Base time.Duration // bound of the first wait; > 0
	Max  time.Duration // cap of every wait; > 0
	// Rand returns a uniform value in [0, n) for n > 0; nil means
	// math/rand/v2.Int64N. Tests inject a fixed one.
	Rand func(n int64) int64

	n int
}

// Next returns the wait before the next attempt and counts a failure.
func (b *Backoff) Next() time.Duration {
	d := b.Base << min(b.n, 20) // 2^20 doublings pass any sane cap without overflowing
	if d <= 0 || d > b.Max {
		d = b.Max
	}
	b.n++
	if d <= 0 {
		return time.Millisecond
	}
	rnd := b.Rand
	if rnd == nil {
		rnd = rand.Int64N
	}
	return time.Duration(rnd(int64(d))) + time.Millisecond
}

// Reset starts over after a success.
func (b *Backoff) Reset() { b.n = 0 }
