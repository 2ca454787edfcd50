package api

import (
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"
	"golang.org/x/time/rate"
)

// limiter keeps a token bucket per key (client IP or openid).
type limiter struct {
	rps float64
	mu  sync.Mutex
	m   map[string]*bucket
}

type bucket struct {
	lim  *rate.Limiter
	last time.Time
}

func newLimiter(rps float64) *limiter {
	if rps <= 0 {
		return nil
	}
	return &limiter{rps: rps, m: map[string]*bucket{}}
}

// allow reports whether key may proceed, and if not how long to wait.
func (l *limiter) allow(key string) (bool, time.Duration) {
	if l == nil {
		return true, 0
	}
	now := time.Now()
	l.mu.Lock()
	b := l.m[key]
	if b == nil {
		b = &bucket{lim: rate.NewLimiter(rate.Limit(l.rps), int(2*l.rps)+1)}
		l.m[key] = b
	}
	b.last = now
	l.mu.Unlock()
	r := b.lim.ReserveN(now, 1)
	if d := r.DelayFrom(now); d > 0 {
		r.CancelAt(now)
		return false, d
	}
	return true, 0
}

func (l *limiter) sweep(idle time.Duration) {
	if l == nil {
		return
	}
	cutoff := time.Now().Add(-idle)
	l.mu.Lock()
	defer l.mu.Unlock()
	for k, b := range l.m {
		if b.last.Before(cutoff) {
			delete(l.m, k)
		}
	}
}

func (s *Server) limitIP(c *fiber.Ctx) error {
	if ok, wait := s.ipLimit.allow(c.IP()); !ok {
		retryAfter(c, wait)
		return fail(c, fiber.StatusTooManyRequests, "too many requests from this address; retry later")
	}
	return c.Next()
}

func (s *Server) limitUser(c *fiber.Ctx) error {
	id, _ := c.Locals(localOpenID).(string)
	if ok, wait := s.userLimit.allow(id); !ok {
		retryAfter(c, wait)
		return fail(c, fiber.StatusTooManyRequests, "too many requests for this user; retry later")
	}
	return c.Next()
}
