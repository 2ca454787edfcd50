package raftnode

import (
	"bytes"
	"errors"
	"fmt"
	"testing"

	"github.com/hashicorp/raft"
)

// countingStore counts the reads that reach the store behind the cache.
type countingStore struct {
	*raft.InmemStore
	gets    int
	failPut bool
}

func (s *countingStore) GetLog(idx uint64, out *raft.Log) error {
	s.gets++
	return s.InmemStore.GetLog(idx, out)
}

func (s *countingStore) StoreLogs(logs []*raft.Log) error {
	if s.failPut {
		return errors.New("disk full")
	}
	return s.InmemStore.StoreLogs(logs)
}

func entry(idx uint64, size int) *raft.Log {
	return &raft.Log{Index: idx, Term: 1, Type: raft.LogCommand, Data: bytes.Repeat([]byte{byte(idx)}, size)}
}

func storeRange(t *testing.T, c *logCache, lo, hi uint64, size int) {
	t.Helper()
	var logs []*raft.Log
	for i := lo; i <= hi; i++ {
		logs = append(logs, entry(i, size))
	}
	if err := c.StoreLogs(logs); err != nil {
		t.Fatal(err)
	}
}

// cached reports which of lo..hi the cache answers without the store, and
// checks every answer against what was written.
func cached(t *testing.T, c *logCache, s *countingStore, lo, hi uint64) []uint64 {
	t.Helper()
	var hits []uint64
	for i := lo; i <= hi; i++ {
		before := s.gets
		var l raft.Log
		err := c.GetLog(i, &l)
		if errors.Is(err, raft.ErrLogNotFound) {
			continue
		}
		if err != nil {
			t.Fatalf("GetLog(%d): %v", i, err)
		}
		if l.Index != i || len(l.Data) == 0 || l.Data[0] != byte(i) {
			t.Fatalf("GetLog(%d) = index %d data %v", i, l.Index, l.Data[:min(len(l.Data), 4)])
		}
		if s.gets == before {
			hits = append(hits, i)
		}
	}
	return hits
}

func TestLogCache(t *testing.T) {
	const size = 1000 // each entry costs size+96 bytes of budget
	cases := []struct {
		name string
		run  func(t *testing.T, c *logCache)
		want string // cached indexes after run
		max  int
	}{
		{name: "keeps the newest within the byte budget", max: 3 * (size + 96),
			run:  func(t *testing.T, c *logCache) { storeRange(t, c, 1, 10, size) },
			want: "[8 9 10]"},
		{name: "single appends", max: 5 * (size + 96),
			run: func(t *testing.T, c *logCache) {
				for i := uint64(1); i <= 4; i++ {
					if err := c.StoreLog(entry(i, size)); err != nil {
						t.Fatal(err)
					}
				}
			},
			want: "[1 2 3 4]"},
		{name: "compaction trims the prefix", max: 100 * (size + 96),
			run: func(t *testing.T, c *logCache) {
				storeRange(t, c, 1, 10, size)
				if err := c.DeleteRange(1, 6); err != nil {
					t.Fatal(err)
				}
			},
			want: "[7 8 9 10]"},
		{name: "a truncated tail empties it", max: 100 * (size + 96),
			run: func(t *testing.T, c *logCache) {
				storeRange(t, c, 1, 10, size)
				if err := c.DeleteRange(8, 10); err != nil {
					t.Fatal(err)
				}
				storeRange(t, c, 8, 9, size) // the new leader's entries
			},
			want: "[8 9]"},
		{name: "a gap restarts the run", max: 100 * (size + 96),
			run: func(t *testing.T, c *logCache) {
				storeRange(t, c, 1, 5, size)
				storeRange(t, c, 20, 22, size) // after a snapshot install
			},
			want: "[20 21 22]"},
		{name: "an entry over the budget is not cached", max: 2 * (size + 96),
			run: func(t *testing.T, c *logCache) {
				storeRange(t, c, 1, 2, size)
				storeRange(t, c, 3, 3, 10*size)
				storeRange(t, c, 4, 4, size)
			},
			want: "[4]"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := &countingStore{InmemStore: raft.NewInmemStore()}
			c := newLogCache(s, tc.max)
			tc.run(t, c)
			if got := fmt.Sprint(cached(t, c, s, 1, 30)); got != tc.want {
				t.Errorf("cached %s, want %s", got, tc.want)
			}
			if c.bytes > tc.max {
				t.Errorf("cache holds %d bytes, budget %d", c.bytes, tc.max)
			}
		})
	}
}

// A failed write leaves nothing cached that the store may not hold.
func TestLogCacheFailedStore(t *testing.T) {
	s := &countingStore{InmemStore: raft.NewInmemStore()}
	c := newLogCache(s, 1<<20)
	storeRange(t, c, 1, 3, 10)
	s.failPut = true
	if err := c.StoreLogs([]*raft.Log{entry(4, 10)}); err == nil {
		t.Fatal("StoreLogs succeeded on a failing store")
	}
	if got := cached(t, c, s, 1, 10); len(got) != 0 {
		t.Errorf("cache answers %v after a failed write, want nothing", got)
	}
}
