package raftnode

import (
	"sync"

	"github.com/hashicorp/raft"
)

// logCache keeps the newest raft log entries in memory, in front of the
// bbolt log store, bounded in bytes.
//
// Why: raft reads back almost every entry it writes. The leader reads each
// entry it replicates, and the previous entry's term for every append it
// sends, idle ones included (one per follower every CommitTimeout); a
// follower reads each entry again to apply it. From bbolt each read is a
// lookup and a msgpack decode of an entry of up to MaxEntryBytes. An idle
// 3-node cluster spent a third of its leader's CPU there.
// raft.LogCache bounds entries by count, and 512 group-committed entries
// held hundreds of MB on the leader under large pushes; this one holds at
// most max bytes of entry data.
//
// The cached entries are a run of consecutive indexes, oldest first. Any
// write that would break the run (a gap, a truncation, a failed store)
// empties it: the cache is only ever a copy of what the store holds.
type logCache struct {
	raft.LogStore
	max int

	mu    sync.Mutex
	logs  []*raft.Log
	bytes int
}

func newLogCache(store raft.LogStore, maxBytes int) *logCache {
	return &logCache{LogStore: store, max: maxBytes}
}

// entrySize is what an entry costs the cache: its data and a fixed
// overhead for the struct.
func entrySize(l *raft.Log) int { return len(l.Data) + len(l.Extensions) + 96 }

// GetLog answers from the cache when it holds idx. The entry shares its
// Data with the cache; raft never writes into a log it read.
func (c *logCache) GetLog(idx uint64, out *raft.Log) error {
	c.mu.Lock()
	if n := len(c.logs); n > 0 {
		if first := c.logs[0].Index; idx >= first && idx-first < uint64(n) {
			*out = *c.logs[idx-first]
			c.mu.Unlock()
			return nil
		}
	}
	c.mu.Unlock()
	return c.LogStore.GetLog(idx, out)
}

func (c *logCache) StoreLog(l *raft.Log) error { return c.StoreLogs([]*raft.Log{l}) }

// StoreLogs writes through, then caches what was written.
func (c *logCache) StoreLogs(logs []*raft.Log) error {
	err := c.LogStore.StoreLogs(logs)
	c.mu.Lock()
	defer c.mu.Unlock()
	if err != nil {
		c.reset() // the store may hold part of the batch
		return err
	}
	for _, l := range logs {
		if n := len(c.logs); n > 0 && l.Index != c.logs[n-1].Index+1 {
			c.reset()
		}
		size := entrySize(l)
		if size > c.max {
			c.reset() // the run must stay consecutive
			continue
		}
		c.logs = append(c.logs, l)
		c.bytes += size
		for c.bytes > c.max {
			c.bytes -= entrySize(c.logs[0])
			c.logs[0] = nil
			c.logs = c.logs[1:]
		}
	}
	return nil
}

// DeleteRange deletes from the store and the cache: a prefix (compaction
// after a snapshot) is trimmed, anything else (a follower truncating a
// conflicting tail) empties the cache.
func (c *logCache) DeleteRange(lo, hi uint64) error {
	c.drop(lo, hi)
	if err := c.LogStore.DeleteRange(lo, hi); err != nil {
		c.mu.Lock()
		c.reset()
		c.mu.Unlock()
		return err
	}
	return nil
}

// drop removes [lo, hi] from the cache before the store deletes it: raft
// reads none of the entries it is deleting, and GetLog must not wait for a
// long compaction.
func (c *logCache) drop(lo, hi uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if n := len(c.logs); n > 0 {
		first, last := c.logs[0].Index, c.logs[n-1].Index
		switch {
		case hi < first || lo > last:
		case lo <= first && hi < last:
			k := int(hi - first + 1)
			for _, l := range c.logs[:k] {
				c.bytes -= entrySize(l)
			}
			clear(c.logs[:k])
			c.logs = c.logs[k:]
		default:
			c.reset()
		}
	}
}

func (c *logCache) reset() {
	clear(c.logs)
	c.logs, c.bytes = c.logs[:0], 0
}
