package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"

	bolt "go.etcd.io/bbolt"
)

// PruneResult reports what a retention pass removed and kept.
type PruneResult struct {
	Deleted  int // readings deleted
	Unsynced int // readings past retention kept because the cloud lacks them
}

// Prune deletes readings older than cutoff (Unix ms) that the cloud already
// holds, along with their dedupe ids and the rollups of periods that no longer
// have readings. Readings not yet synced are never deleted, whatever their
// age. It works in short transactions so ingest is never stalled for long.
func (s *Store) Prune(ctx context.Context, cutoff int64) (PruneResult, error) {
	var res PruneResult
	var devices []string
	err := s.db.View(func(tx *bolt.Tx) error {
		var err error
		devices, err = spanDevices(tx.Bucket(bucketReadings))
		return err
	})
	if err != nil {
		return res, fmt.Errorf("prune: list devices: %w", err)
	}
	for _, dev := range devices {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		r, err := s.pruneDevice(dev, cutoff)
		res.Deleted += r.Deleted
		res.Unsynced += r.Unsynced
		if err != nil {
			return res, fmt.Errorf("prune %s: %w", dev, err)
		}
	}
	return res, nil
}

const pruneChunk = 5000

func (s *Store) pruneDevice(dev string, cutoff int64) (PruneResult, error) {
	var total PruneResult
	var resume []byte // first key the next chunk examines; nil: the first key
	for {
		var res PruneResult
		more := false
		err := s.db.Update(func(tx *bolt.Tx) error {
			acked := getU64(tx.Bucket(bucketMeta).Get(keyOutboxAcked))
			rb := newSpan(tx.Bucket(bucketReadings), dev)
			ib := newSpan(tx.Bucket(bucketIDs), dev)
			c := rb.Cursor()
			touched := map[int64]struct{}{} // minutes that lost readings
			var k, v []byte
			if resume == nil {
				k, v = c.First()
			} else {
				k, v = c.Seek(resume)
			}
			for seen := 0; k != nil && keyTS(k) < cutoff; seen++ {
				if seen == pruneChunk {
					// Resume after what this chunk examined, so that a long
					// run of unsynced readings is neither rescanned by every
					// chunk nor ends the pass early.
					more = true
					resume = append([]byte(nil), k...)
					break
				}
				if readingSeq(v) > acked {
					res.Unsynced++
					k, v = c.Next()
					continue
				}
				if r, _, err := decodeReadingValue(k, v); err == nil && r.ID != "" {
					if err := ib.Delete([]byte(r.ID)); err != nil {
						return err
					}
				}
				ts := keyTS(k)
				touched[ts-mod(ts, minuteMs)] = struct{}{}
				// bbolt cursors may skip an element after Delete; re-seek from
				// a copy of the deleted key instead of calling Next.
				key := append([]byte(nil), k...)
				if err := c.Delete(); err != nil {
					return err
				}
				res.Deleted++
				k, v = c.Seek(key)
			}
			if res.Deleted == 0 {
				return nil
			}
			if err := recomputeRollups(tx, dev, touched); err != nil {
				return err
			}
			m := tx.Bucket(bucketMeta)
			n := getU64(m.Get(keyReadings))
			return m.Put(keyReadings, u64(n-uint64(min(uint64(res.Deleted), n))))
		})
		if err != nil {
			return total, err
		}
		if res.Deleted > 0 {
			s.readings.Add(^uint64(res.Deleted - 1)) // subtract
		}
		total.Deleted += res.Deleted
		total.Unsynced += res.Unsynced
		if !more {
			return total, nil
		}
	}
}

// recomputeRollups rebuilds the minute cells of the given minutes from the
// readings that remain, then the hour cells of their hours from the minute
// cells, so that rollups agree with the raw data after a deletion: a period
// may keep unsynced readings, or lie across the cutoff.
func recomputeRollups(tx *bolt.Tx, dev string, minutes map[int64]struct{}) error {
	if len(minutes) == 0 {
		return nil
	}
	mb := newSpan(tx.Bucket(bucketMinute), dev)
	rb := newSpan(tx.Bucket(bucketReadings), dev)
	metrics, err := rollupMetrics(mb)
	if err != nil {
		return err
	}
	hours := map[int64]struct{}{}
	for minute := range minutes {
		hours[minute-mod(minute, hourMs)] = struct{}{}
		for _, name := range metrics {
			if err := mb.Delete(rollupKey(name, minute)); err != nil {
				return err
			}
		}
		cells := map[string]*agg{}
		c := rb.Cursor()
		for k, v := c.Seek(u64(uint64(minute))); k != nil && keyTS(k) < minute+minuteMs; k, v = c.Next() {
			r, _, err := decodeReadingValue(k, v)
			if err != nil {
				return err
			}
			for _, mt := range r.Metrics {
				a := cells[mt.Name]
				if a == nil {
					a = new(agg)
					cells[mt.Name] = a
				}
				a.add(mt.Value)
			}
		}
		for name, a := range cells {
			if err := mb.Put(rollupKey(name, minute), a.encode()); err != nil {
				return err
			}
		}
	}
	hb := newSpan(tx.Bucket(bucketHour), dev)
	for hour := range hours {
		for _, name := range metrics {
			key := rollupKey(name, hour)
			prefix := key[:len(name)+1]
			var a agg
			c := mb.Cursor()
			for k, v := c.Seek(key); k != nil && bytes.HasPrefix(k, prefix) &&
				int64(binary.BigEndian.Uint64(k[len(prefix):])) < hour+hourMs; k, v = c.Next() {
				cell, err := decodeAgg(v)
				if err != nil {
					return err
				}
				a.merge(cell)
			}
			if a.Count == 0 {
				err = hb.Delete(key)
			} else {
				err = hb.Put(key, a.encode())
			}
			if err != nil {
				return err
			}
		}
	}
	return nil
}

// rollupMetrics lists the metric names that have cells in a rollup bucket.
// Cells are keyed metric|0|start; it visits one key per metric.
func rollupMetrics(b *span) ([]string, error) {
	var names []string
	c := b.Cursor()
	for k, _ := c.First(); k != nil; {
		i := bytes.IndexByte(k, 0)
		if i < 0 || len(k) != i+9 {
			return nil, errCorrupt
		}
		names = append(names, string(k[:i]))
		next := append(append([]byte(nil), k[:i]...), 1) // just after every name|0|…
		k, _ = c.Seek(next)
	}
	return names, nil
}
