package backoff

import (
	"testing"
	"time"
)

// The bound doubles from Base until Max, and the draw is used as is: a rand
// that returns its largest value walks the bound, one that returns 0 gives
// the 1 ms floor.
func TestNextBoundAndJitter(t *testing.T) {
	const ms = time.Millisecond
	top := func(n int64) int64 { return n - 1 }
	tests := []struct {
		name      string
		base, max time.Duration
		rand      func(int64) int64
		want      []time.Duration
	}{
		{"doubles to the cap", 100 * ms, 500 * ms, top,
			[]time.Duration{101*ms - 1, 201*ms - 1, 401*ms - 1, 501*ms - 1, 501*ms - 1}},
		{"cap below base", time.Second, 300 * ms, top, []time.Duration{301*ms - 1, 301*ms - 1}},
		{"zero draw is the floor", 100 * ms, time.Second, func(int64) int64 { return 0 }, []time.Duration{ms, ms, ms}},
		{"half", 100 * ms, time.Second, func(n int64) int64 { return n / 2 },
			[]time.Duration{51 * ms, 101 * ms, 201 * ms, 401 * ms, 501 * ms}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := Backoff{Base: tt.base, Max: tt.max, Rand: tt.rand}
			for i, want := range tt.want {
				if got := b.Next(); got != want {
					t.Fatalf("wait %d = %s, want %s", i, got, want)
				}
			}
		})
	}
}

// Reset returns to the first bound; a huge failure count neither overflows
// nor passes the cap; the default rand stays inside the bound.
func TestResetOverflowDefaultRand(t *testing.T) {
	var bounds []int64
	b := Backoff{Base: time.Second, Max: time.Minute, Rand: func(n int64) int64 { bounds = append(bounds, n); return 0 }}
	for range 100 {
		b.Next()
	}
	for i, n := range bounds {
		if n <= 0 || n > int64(time.Minute) {
			t.Fatalf("attempt %d drew from [0, %d)", i, n)
		}
	}
	b.Reset()
	b.Next()
	if got := bounds[len(bounds)-1]; got != int64(time.Second) {
		t.Fatalf("after Reset the bound is %s, want the base", time.Duration(got))
	}

	d := Backoff{Base: 10 * time.Millisecond, Max: 40 * time.Millisecond}
	for n := range 50 {
		bound := min(40*time.Millisecond, 10*time.Millisecond<<min(n, 20))
		if w := d.Next(); w < time.Millisecond || w > bound+time.Millisecond {
			t.Fatalf("attempt %d: wait %s outside [1ms, %s]", n, w, bound+time.Millisecond)
		}
	}
}
