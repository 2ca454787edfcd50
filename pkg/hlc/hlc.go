// Package hlc implements hybrid logical clocks: timestamps that follow wall
// time when clocks behave and still order causally related events when they
// do not. Edge and cloud stamp every device-state field with one, so that
// last-writer-wins merges agree on every node regardless of skew.
package hlc

import (
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"
)

// Timestamp packs wall milliseconds (upper 48 bits) and a logical counter
// (lower 16 bits) into one integer, so that stamps compare with < and sort as
// big-endian bytes.
type Timestamp uint64

const logicalBits = 16

const maxLogical = 1<<logicalBits - 1

// New builds a timestamp from wall milliseconds and a logical counter.
func New(wallMs int64, logical uint16) Timestamp {
	return Timestamp(uint64(wallMs)<<logicalBits | uint64(logical))
}

// WallMs is the wall-clock part in Unix milliseconds.
func (t Timestamp) WallMs() int64 { return int64(uint64(t) >> logicalBits) }

// Logical is the counter that orders events within one millisecond.
func (t Timestamp) Logical() uint16 { return uint16(uint64(t) & maxLogical) }

// IsZero reports whether t is the zero stamp, which precedes every real one.
func (t Timestamp) IsZero() bool { return t == 0 }

// String renders t as "wallms.logical", which Parse reads back.
func (t Timestamp) String() string {
	return strconv.FormatInt(t.WallMs(), 10) + "." + strconv.FormatUint(uint64(t.Logical()), 10)
}

// MarshalText renders t as its String form, so JSON carries it unambiguously
// (a 64-bit integer would lose precision in JavaScript clients).
func (t Timestamp) MarshalText() ([]byte, error) { return []byte(t.String()), nil }

// UnmarshalText parses the String form.
func (t *Timestamp) UnmarshalText(b []byte) error {
	v, err := Parse(string(b))
	if err != nil {
		return err
	}
	*t = v
	return nil
}

// Parse reads a stamp in the "wallms.logical" form.
func Parse(s string) (Timestamp, error) {
	for i := 0; i < len(s); i++ {
		if s[i] != '.' {
			continue
		}
		w, err := strconv.ParseInt(s[:i], 10, 64)
		if err != nil || w < 0 || w >= 1<<(64-logicalBits) {
			return 0, fmt.Errorf("hlc: bad wall time in %q", s)
		}
		l, err := strconv.ParseUint(s[i+1:], 10, logicalBits)
		if err != nil {
			return 0, fmt.Errorf("hlc: bad logical counter in %q", s)
		}
		return New(w, uint16(l)), nil
	}
	return 0, fmt.Errorf("hlc: %q is not of the form wallms.logical", s)
}

// ErrDrift is returned by Update when a remote stamp is further ahead of the
// local wall clock than the configured maximum drift; such stamps are not
// trusted, because adopting them would let one bad clock win every merge.
var ErrDrift = errors.New("hlc: remote timestamp beyond maximum clock drift")

// Clock issues monotonically increasing timestamps. The zero value is not
// usable; build one with NewClock.
type Clock struct {
	mu       sync.Mutex
	last     Timestamp
	now      func() time.Time
	maxDrift time.Duration
}

// NewClock returns a clock reading wall time from now (time.Now when nil)
// that rejects remote stamps more than maxDrift ahead (no limit when 0).
func NewClock(now func() time.Time, maxDrift time.Duration) *Clock {
	if now == nil {
		now = time.Now
	}
	return &Clock{now: now, maxDrift: maxDrift}
}

// Now returns a stamp greater than every stamp this clock issued or observed.
func (c *Clock) Now() Timestamp {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.tick(0)
}

// tick advances the clock past both wall time and floor. Callers hold mu.
func (c *Clock) tick(floor Timestamp) Timestamp {
	wall := New(c.now().UnixMilli(), 0)
	next := c.last
	if floor > next {
		next = floor
	}
	if wall > next {
		c.last = wall
		return wall
	}
	if next.Logical() == maxLogical {
		// Logical counter exhausted: borrow the next millisecond rather than
		// wrap, which would break monotonicity.
		next = New(next.WallMs()+1, 0)
	} else {
		next++
	}
	c.last = next
	return next
}

// Update folds in a stamp observed from another node and returns a local stamp
// after it. A stamp more than maxDrift ahead of local wall time is rejected
// with ErrDrift and leaves the clock untouched.
func (c *Clock) Update(remote Timestamp) (Timestamp, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.check(remote); err != nil {
		return 0, err
	}
	return c.tick(remote), nil
}

// Check reports whether remote is within the drift bound without changing
// the clock.
func (c *Clock) Check(remote Timestamp) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.check(remote)
}

func (c *Clock) check(remote Timestamp) error {
	if c.maxDrift <= 0 {
		return nil
	}
	ahead := time.Duration(remote.WallMs()-c.now().UnixMilli()) * time.Millisecond
	if ahead > c.maxDrift {
		return fmt.Errorf("%w: %s ahead (max %s)", ErrDrift, ahead, c.maxDrift)
	}
	return nil
}

// Last returns the greatest stamp issued or observed, for persisting a
// high-water mark that survives a restart with a clock that went backwards.
func (c *Clock) Last() Timestamp {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.last
}

// Restore raises the clock to at least t, typically a persisted high-water
// mark; it never lowers it.
func (c *Clock) Restore(t Timestamp) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if t > c.last {
		c.last = t
	}
}
