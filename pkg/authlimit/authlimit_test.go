package authlimit

import (
	"fmt"
	"testing"
	"time"
)

type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

func TestLimiter(t *testing.T) {
	c := &clock{t: time.Unix(1000, 0)}
	l := New(Config{Rate: 10, MaxAddrs: 3, Now: c.now})
	// The burst (2×rate) of failures passes, the next attempt waits.
	for i := 0; i < 20; i++ {
		if _, ok := l.Allow("a"); !ok {
			t.Fatalf("attempt %d refused inside the burst", i)
		}
		l.Fail("a")
	}
	wait, ok := l.Allow("a")
	if ok || wait <= 0 || wait > 100*time.Millisecond {
		t.Fatalf("after the burst: ok=%v wait=%s, want refused for ≤100ms", ok, wait)
	}
	if _, ok := l.Allow("b"); !ok {
		t.Fatal("another address is throttled too")
	}
	// It refills at the rate.
	c.t = c.t.Add(100 * time.Millisecond)
	if _, ok := l.Allow("a"); !ok {
		t.Fatal("not allowed again after 1/rate")
	}
	l.Fail("a")
	if _, ok := l.Allow("a"); ok {
		t.Fatal("one refilled token let two failures through")
	}
	// The table is bounded: the address that failed longest ago goes first.
	for i := 0; i < 5; i++ {
		l.Fail(fmt.Sprintf("x%d", i))
	}
	if n := l.Len(); n != 3 {
		t.Fatalf("tracking %d addresses, want the bound 3", n)
	}
	if _, ok := l.Allow("a"); !ok {
		t.Fatal("evicted address still refused")
	}
}

func TestDisabled(t *testing.T) {
	l := New(Config{Rate: 0})
	if l != nil {
		t.Fatal("rate 0 must disable the limiter")
	}
	for i := 0; i < 1000; i++ {
		l.Fail("a")
	}
	if _, ok := l.Allow("a"); !ok {
		t.Fatal("a nil limiter refused")
	}
}
