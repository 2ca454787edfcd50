package store

import (
	"bytes"
	"fmt"

	bolt "go.etcd.io/bbolt"
)

// A span is one device's keys in a bucket all devices share (readings, ids,
// rollups): each key is the device id, a 0 byte (device ids never hold
// one, see ident.Valid), then the key within the device. One shared bucket
// instead of a nested bucket per device is what makes a group commit
// touching 100 devices cheap: bbolt rewrites every page it dirtied, and
// each nested bucket adds its own root (or, inline, its parent's leaf) to
// the leaves the new keys land in.
type span struct {
	b      *bolt.Bucket
	prefix []byte // device 0
	buf    []byte // builds full keys; bbolt copies keys on Put
}

func newSpan(b *bolt.Bucket, dev string) *span {
	return &span{b: b, prefix: spanPrefix(dev)}
}

// spanPrefix is a device's prefix in the shared buckets.
func spanPrefix(dev string) []byte {
	return append(append(make([]byte, 0, len(dev)+1), dev...), 0)
}

func (s *span) full(k []byte) []byte {
	s.buf = append(append(s.buf[:0], s.prefix...), k...)
	return s.buf
}

func (s *span) Get(k []byte) []byte { return s.b.Get(s.full(k)) }

func (s *span) Put(k, v []byte) error { return s.b.Put(s.full(k), v) }

func (s *span) Delete(k []byte) error { return s.b.Delete(s.full(k)) }

// Cursor walks the span's keys, which it returns without the prefix.
func (s *span) Cursor() *spanCursor {
	return &spanCursor{c: s.b.Cursor(), prefix: s.prefix}
}

// devSpans holds a device's spans and cursors for one Ingest, so that the
// batch allocates them with the device's devBatch, sharing one prefix.
type devSpans struct {
	prefix        []byte
	readings, ids span
	readingsC     spanCursor
}

// open points sp and, when c is not nil, c at the device's span of b.
func (d *devSpans) open(dev string, b *bolt.Bucket, sp *span, c *spanCursor) *span {
	if d.prefix == nil {
		d.prefix = spanPrefix(dev)
	}
	*sp = span{b: b, prefix: d.prefix}
	if c != nil {
		*c = spanCursor{c: b.Cursor(), prefix: d.prefix}
	}
	return sp
}

type spanCursor struct {
	c      *bolt.Cursor
	prefix []byte
	buf    []byte
}

// in strips the prefix, or ends the walk at a key of another device.
func (c *spanCursor) in(k, v []byte) ([]byte, []byte) {
	if k == nil || !bytes.HasPrefix(k, c.prefix) {
		return nil, nil
	}
	return k[len(c.prefix):], v
}

func (c *spanCursor) Seek(k []byte) ([]byte, []byte) {
	c.buf = append(append(c.buf[:0], c.prefix...), k...)
	return c.in(c.c.Seek(c.buf))
}

func (c *spanCursor) First() ([]byte, []byte) { return c.in(c.c.Seek(c.prefix)) }

// Last is the span's greatest key: the one before the first key past the
// prefix (device 1).
func (c *spanCursor) Last() ([]byte, []byte) {
	c.buf = append(c.buf[:0], c.prefix...)
	c.buf[len(c.buf)-1] = 1
	if k, _ := c.c.Seek(c.buf); k == nil {
		return c.in(c.c.Last())
	}
	return c.in(c.c.Prev())
}

func (c *spanCursor) Next() ([]byte, []byte) { return c.in(c.c.Next()) }

func (c *spanCursor) Delete() error { return c.c.Delete() }

// spanDevices lists the devices that have keys in a shared bucket, visiting
// one key per device.
func spanDevices(b *bolt.Bucket) ([]string, error) {
	var devs []string
	c := b.Cursor()
	var next []byte
	for k, _ := c.First(); k != nil; k, _ = c.Seek(next) {
		i := bytes.IndexByte(k, 0)
		if i < 0 {
			return nil, errCorrupt
		}
		devs = append(devs, string(k[:i]))
		next = append(append(next[:0], k[:i]...), 1) // just past every device 0 …
	}
	return devs, nil
}

// Files written before the shared buckets kept a nested bucket per device
// in these; Open moves their keys into the shared buckets (migrateLayout).
var (
	legacyReadings = []byte("readings")
	legacyIDs      = []byte("ids")
	legacyMinute   = []byte("rollup_1m")
	legacyHour     = []byte("rollup_1h")
)

// migrateChunk bounds the keys one migration transaction moves.
const migrateChunk = 10000

// migrateLayout moves the keys of every per-device nested bucket of the
// legacy buckets into the shared ones, in transactions of at most
// limit keys, each deleting what it copied, and drops a legacy
// bucket once it is empty. Every transaction leaves each key in exactly
// one of the two places, and Open finishes the move before anything reads
// the store, so a crash mid-way costs nothing: the next Open continues.
func migrateLayout(db *bolt.DB, limit int) error {
	for _, m := range [][2][]byte{{legacyReadings, bucketReadings}, {legacyIDs, bucketIDs}, {legacyMinute, bucketMinute}, {legacyHour, bucketHour}} {
		// Look first: a write transaction commits (and syncs) even when
		// it changes nothing, and a converted file has no legacy bucket.
		var present bool
		if err := db.View(func(tx *bolt.Tx) error { present = tx.Bucket(m[0]) != nil; return nil }); err != nil {
			return err
		}
		for done := !present; !done; {
			err := db.Update(func(tx *bolt.Tx) error {
				var err error
				done, err = migrateChunkOf(tx, m[0], m[1], limit)
				return err
			})
			if err != nil {
				return fmt.Errorf("migrate %s to %s: %w", m[0], m[1], err)
			}
		}
	}
	return nil
}

// migrateChunkOf moves up to limit keys from old to shared; done
// when old is gone.
func migrateChunkOf(tx *bolt.Tx, old, shared []byte, limit int) (done bool, err error) {
	ob := tx.Bucket(old)
	if ob == nil {
		return true, nil
	}
	nb, err := tx.CreateBucketIfNotExists(shared)
	if err != nil {
		return false, err
	}
	nb.FillPercent = 0.9
	moved := 0
	c := ob.Cursor()
	for dev, v := c.First(); dev != nil; dev, v = c.First() {
		if v != nil {
			return false, fmt.Errorf("key %q in %s: %w", dev, old, errCorrupt)
		}
		name := string(dev)
		db := ob.Bucket(dev)
		sp := newSpan(nb, name)
		dc := db.Cursor()
		for k, v := dc.First(); k != nil; k, v = dc.First() {
			if moved >= max(limit, 1) {
				return false, nil
			}
			if err := sp.Put(k, bytes.Clone(v)); err != nil {
				return false, err
			}
			if err := dc.Delete(); err != nil {
				return false, err
			}
			moved++
		}
		if err := ob.DeleteBucket([]byte(name)); err != nil {
			return false, err
		}
	}
	return true, tx.DeleteBucket(old)
}
