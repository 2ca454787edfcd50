package hlc

import (
	"errors"
	"sync"
	"testing"
	"time"
)

type fakeWall struct {
	mu sync.Mutex
	t  time.Time
}

func (f *fakeWall) now() time.Time  { f.mu.Lock(); defer f.mu.Unlock(); return f.t }
func (f *fakeWall) set(t time.Time) { f.mu.Lock(); f.t = t; f.mu.Unlock() }

func TestNowMonotonicWhenWallGoesBackwards(t *testing.T) {
	w := &fakeWall{t: time.UnixMilli(1_000_000)}
	c := NewClock(w.now, 0)
	a := c.Now()
	w.set(time.UnixMilli(500_000)) // clock stepped back
	b := c.Now()
	if b <= a {
		t.Fatalf("stamp went backwards: %s then %s", a, b)
	}
	if b.WallMs() != a.WallMs() || b.Logical() != a.Logical()+1 {
		t.Fatalf("expected logical tick after %s, got %s", a, b)
	}
	w.set(time.UnixMilli(2_000_000))
	if c.Now() != New(2_000_000, 0) {
		t.Fatal("clock did not follow wall time forward")
	}
}

func TestLogicalOverflowBorrowsMillisecond(t *testing.T) {
	w := &fakeWall{t: time.UnixMilli(10)}
	c := NewClock(w.now, 0)
	c.Restore(New(10, maxLogical))
	got := c.Now()
	if got != New(11, 0) {
		t.Fatalf("got %s, want 11.0", got)
	}
}

func TestUpdate(t *testing.T) {
	w := &fakeWall{t: time.UnixMilli(1_000_000)}
	c := NewClock(w.now, 5*time.Minute)
	tests := []struct {
		name    string
		remote  Timestamp
		wantErr error
		wantMin Timestamp
	}{
		{"past", New(10, 3), nil, New(1_000_000, 0)},
		{"slightly ahead", New(1_060_000, 7), nil, New(1_060_000, 8)},
		{"beyond drift", New(1_000_000+int64(time.Hour/time.Millisecond), 0), ErrDrift, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := c.Last()
			got, err := c.Update(tt.remote)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			if err != nil {
				if c.Last() != before {
					t.Fatal("rejected stamp moved the clock")
				}
				return
			}
			if got < tt.wantMin || got <= tt.remote {
				t.Fatalf("got %s, want > %s and >= %s", got, tt.remote, tt.wantMin)
			}
		})
	}
}

func TestTextRoundTrip(t *testing.T) {
	for _, ts := range []Timestamp{0, New(1732170000123, 0), New(1732170000123, 65535)} {
		b, _ := ts.MarshalText()
		var got Timestamp
		if err := got.UnmarshalText(b); err != nil || got != ts {
			t.Fatalf("round trip %s: got %s, %v", ts, got, err)
		}
	}
	for _, bad := range []string{"", "12", "a.1", "1.b", "1.70000", "-1.0"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) accepted", bad)
		}
	}
}

func TestConcurrentNowUnique(t *testing.T) {
	c := NewClock(nil, 0)
	var mu sync.Mutex
	seen := map[Timestamp]bool{}
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 1000; i++ {
				ts := c.Now()
				mu.Lock()
				if seen[ts] {
					t.Errorf("duplicate stamp %s", ts)
				}
				seen[ts] = true
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
}
