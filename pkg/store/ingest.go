package store

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"sync"

	bolt "go.etcd.io/bbolt"

	"github.com/outpost-edge/outpost/pkg/shadow"
)

// Item is one decoded device message to store: readings, reported state, or
// both.
type Item struct {
	Device     string
	ReceivedAt int64 // Unix ms
	Readings   []Reading
	// State holds reported-state fields from sensors/{device}/state; nil when
	// the message carried none.
	State map[string]json.RawMessage
}

// ItemResult says what Ingest did with one item.
type ItemResult struct {
	Stored       int // readings newly stored
	Duplicates   int // readings already present (redelivery)
	StateChanged bool
}

// Ingest stores a batch of items and dead letters in one transaction, the
// group commit: each new reading once (duplicates by message id, or by
// timestamp and values, are skipped), rollups, the device registry, and one
// outbox entry per change. When it returns nil the batch is durable.
func (s *Store) Ingest(items []Item, dead []DeadLetter) ([]ItemResult, error) {
	results := make([]ItemResult, len(items))
	var newReadings, newDevices, deadCount uint64
	head := s.outboxHead.Load()
	var written []cachedDevice
	err := s.db.Update(func(tx *bolt.Tx) error {
		head = getU64(tx.Bucket(bucketMeta).Get(keyOutboxHead))
		written = nil
		// Outbox keys only ever grow: full pages halve the pages a commit
		// writes for it (bbolt's default splits leave them half empty).
		tx.Bucket(bucketOutbox).FillPercent = 1
		w := batchWriter{
			s: s, tx: tx,
			readings: tx.Bucket(bucketReadings), ids: tx.Bucket(bucketIDs), seenB: tx.Bucket(bucketSeen),
			rbs: map[string]*bolt.Bucket{}, ibs: map[string]*bolt.Bucket{}, rcs: map[string]*bolt.Cursor{},
			devices: map[string]*Device{}, dirty: map[string]bool{}, seen: map[string]int64{},
			shared: map[string]bool{}, rollups: map[rollupCell]*agg{}, newest: map[string][16]byte{},
		}
		for i := range items {
			r, err := w.item(&items[i], &head)
			if err != nil {
				return fmt.Errorf("device %s: %w", items[i].Device, err)
			}
			results[i] = r
			newReadings += uint64(r.Stored)
		}
		if err := w.flushDevices(&written); err != nil {
			return err
		}
		newDevices = w.newDevices
		if err := w.flushRollups(); err != nil {
			return err
		}
		var err error
		if deadCount, err = s.putDeadLetters(tx, dead); err != nil {
			return fmt.Errorf("dead letters: %w", err)
		}
		// Raised before the commit: if it fails, the bounds are only too
		// high, which costs lookups, never a missed duplicate.
		s.newest.raise(w.newest)
		return s.commitMeta(tx, head, newReadings, newDevices)
	})
	if err != nil {
		return nil, fmt.Errorf("ingest batch of %d: %w", len(items), err)
	}
	s.devCache.update(written)
	storeMax(&s.outboxHead, head)
	s.readings.Add(newReadings)
	s.devices.Add(newDevices)
	s.deadCount.Store(deadCount)
	return results, nil
}

// flushDevices writes each touched device's last-seen record and the JSON
// record of each device registered or changed in this batch. A batch of
// readings alone writes only the small fixed-size records: the JSON record
// and the pages it spans stay untouched.
func (w *batchWriter) flushDevices(written *[]cachedDevice) error {
	for id, at := range w.seen {
		w.val = binary.BigEndian.AppendUint64(w.val[:0], uint64(at))
		if err := w.seenB.Put([]byte(id), w.keep(w.val)); err != nil {
			return fmt.Errorf("last seen of %s: %w", id, err)
		}
	}
	for id := range w.dirty {
		d := w.devices[id]
		d.LastSeen = max(d.LastSeen, w.seen[id])
		raw, err := json.Marshal(d)
		if err != nil {
			return fmt.Errorf("encode device %s: %w", id, err)
		}
		if err := w.tx.Bucket(bucketDevices).Put([]byte(id), raw); err != nil {
			return err
		}
		*written = append(*written, cachedDevice{raw: raw, d: d})
	}
	return nil
}

type rollupCell struct {
	device, metric string
	minute         int64
}

// batchWriter carries per-transaction caches so that a batch touching the
// same device many times opens its buckets and decodes its record once.
type batchWriter struct {
	s        *Store
	tx       *bolt.Tx
	readings *bolt.Bucket
	ids      *bolt.Bucket
	rbs, ibs map[string]*bolt.Bucket
	// rcs holds a cursor per readings bucket for the dedupe lookups: a
	// Seek reuses the cursor's stack where each Get allocates a new one.
	rcs map[string]*bolt.Cursor
	// newest holds, per device whose readings this batch touched, a key
	// no stored reading of the device exceeds (see newestKeys).
	newest map[string][16]byte
	seenB  *bolt.Bucket
	// seen is the last-seen time of each device the batch touched;
	// devices the decoded records the batch needed, dirty those whose
	// JSON record it must write (registered, or state changed).
	seen    map[string]int64
	devices map[string]*Device
	dirty   map[string]bool
	// shared marks devices whose maps are the device cache's: they are
	// cloned before a state merge changes them.
	shared     map[string]bool
	rollups    map[rollupCell]*agg
	aggs       []agg // backs the cells of rollups and of the hours (see newAgg)
	newDevices uint64
	scratch    []byte
	val        []byte
	slab       []byte    // backs the values put in this transaction (see keep)
	fresh      []Reading // the item's new readings; encoded into the outbox entry, then reused
}

// slabSize is the chunk keep allocates: about a page of readings.
const slabSize = 32 << 10

// keep copies b into memory that stays untouched until the transaction
// ends: bbolt copies keys but keeps references to values until commit.
// Values share a few large chunks instead of one allocation each.
func (w *batchWriter) keep(b []byte) []byte {
	if len(w.slab)+len(b) > cap(w.slab) {
		w.slab = make([]byte, 0, max(slabSize, len(b)))
	}
	n := len(w.slab)
	w.slab = append(w.slab, b...)
	return w.slab[n:len(w.slab):len(w.slab)]
}

func (w *batchWriter) bucket(parent *bolt.Bucket, cache map[string]*bolt.Bucket, dev string) (*bolt.Bucket, error) {
	if b, ok := cache[dev]; ok {
		return b, nil
	}
	b, err := parent.CreateBucketIfNotExists([]byte(dev))
	if err != nil {
		return nil, err
	}
	b.FillPercent = 0.9 // keys arrive mostly in time order
	cache[dev] = b
	return b, nil
}

// device returns the decoded record of a device, registering it if
// unknown.
func (w *batchWriter) device(id string, now int64) (*Device, error) {
	if d, ok := w.devices[id]; ok {
		return d, nil
	}
	raw := w.tx.Bucket(bucketDevices).Get([]byte(id))
	var d *Device
	switch {
	case raw == nil:
		d = w.s.newDevice(id, now)
		w.newDevices++
		w.dirty[id] = true
	default:
		if c := w.s.devCache.get(id, raw); c != nil {
			cp := *c
			d = &cp
			w.shared[id] = true
			break
		}
		d = new(Device)
		if err := json.Unmarshal(raw, d); err != nil {
			return nil, fmt.Errorf("decode device %s: %w", id, err)
		}
	}
	w.devices[id] = d
	return d, nil
}

// touch records that a device was seen at at, registering it if unknown.
// A device with a last-seen record is registered; one without is new, or
// was registered by an API write, the cloud or an edge that kept last_seen
// only in the JSON record, which then still holds it.
func (w *batchWriter) touch(id string, at int64) error {
	if old, ok := w.seen[id]; ok {
		w.seen[id] = max(old, at)
		return nil
	}
	if v := w.seenB.Get([]byte(id)); v != nil {
		w.seen[id] = max(int64(getU64(v)), at)
		return nil
	}
	d, err := w.device(id, at)
	if err != nil {
		return err
	}
	w.seen[id] = max(d.LastSeen, at)
	return nil
}

func (w *batchWriter) item(it *Item, head *uint64) (ItemResult, error) {
	var res ItemResult
	if err := w.touch(it.Device, it.ReceivedAt); err != nil {
		return res, err
	}
	if len(it.Readings) > 0 {
		var err error
		if res, err = w.readingsOf(it, head); err != nil {
			return res, err
		}
	}
	if len(it.State) > 0 {
		d, err := w.device(it.Device, it.ReceivedAt)
		if err != nil {
			return res, err
		}
		if w.shared[it.Device] {
			d.Reported = d.Reported.Clone()
			delete(w.shared, it.Device)
		}
		delta := shadow.Patch(it.State, w.s.clock.Now())
		if changed := d.Reported.Merge(delta); len(changed) > 0 {
			res.StateChanged = true
			w.dirty[it.Device] = true
			c := Change{Kind: ChangeReported, Device: it.Device, Stamp: delta.Version(), Doc: delta}
			if err := w.s.appendOutbox(w.tx, head, &c); err != nil {
				return res, err
			}
		}
	}
	return res, nil
}

func (w *batchWriter) readingsOf(it *Item, head *uint64) (ItemResult, error) {
	var res ItemResult
	rb, err := w.bucket(w.readings, w.rbs, it.Device)
	if err != nil {
		return res, err
	}
	rc := w.rcs[it.Device]
	if rc == nil {
		rc = rb.Cursor()
		w.rcs[it.Device] = rc
	}
	newest, ok := w.newest[it.Device]
	if !ok {
		if newest, ok = w.s.newest.get(it.Device); !ok {
			// First batch of the device since the store opened.
			if k, _ := rc.Last(); k != nil {
				copy(newest[:], k)
			}
		}
	}
	seq := *head + 1 // the outbox entry these readings will travel in
	fresh := w.fresh[:0]
	for i := range it.Readings {
		r := &it.Readings[i]
		w.scratch = appendMetrics(w.scratch[:0], r.Metrics)
		key := readingKey(r, w.scratch)
		var ib *bolt.Bucket
		if r.ID != "" && r.ReceiveTS {
			if ib, err = w.bucket(w.ids, w.ibs, it.Device); err != nil {
				return res, err
			}
			if ib.Get([]byte(r.ID)) != nil {
				res.Duplicates++
				continue
			}
		}
		// A key above every stored one cannot be a duplicate: devices send
		// in time order, so most readings need no lookup. The cursor seeks
		// from the bucket's root each time, so the puts since its last use
		// do not matter.
		if bytes.Compare(key[:], newest[:]) <= 0 {
			if k, _ := rc.Seek(key[:]); bytes.Equal(k, key[:]) {
				res.Duplicates++
				continue
			}
		} else {
			newest = key
		}
		w.val = encodeReadingValue(w.val[:0], seq, r.ID, w.scratch)
		if err := rb.Put(key[:], w.keep(w.val)); err != nil {
			return res, err
		}
		if ib != nil {
			if err := ib.Put([]byte(r.ID), w.keep(key[:])); err != nil {
				return res, err
			}
		}
		minute := r.TS - r.TS%minuteMs
		for _, m := range r.Metrics {
			cell := rollupCell{it.Device, m.Name, minute}
			a := w.rollups[cell]
			if a == nil {
				a = w.newAgg()
				w.rollups[cell] = a
			}
			a.add(m.Value)
		}
		fresh = append(fresh, *r)
		res.Stored++
	}
	w.newest[it.Device] = newest
	w.fresh = fresh // appendOutbox encodes it, so the next item may reuse it
	if len(fresh) > 0 {
		c := Change{Kind: ChangeReadings, Device: it.Device, Stamp: w.s.clock.Now(), Readings: fresh}
		if err := w.s.appendOutbox(w.tx, head, &c); err != nil {
			return res, err
		}
		if c.Seq != seq {
			return res, fmt.Errorf("outbox sequence %d, expected %d", c.Seq, seq)
		}
	}
	return res, nil
}

// newAgg returns a zero cell from a chunk: a batch has a few hundred.
func (w *batchWriter) newAgg() *agg {
	if len(w.aggs) == cap(w.aggs) {
		w.aggs = make([]agg, 0, 256)
	}
	w.aggs = w.aggs[:len(w.aggs)+1]
	return &w.aggs[len(w.aggs)-1]
}

// flushRollups folds the batch's per-minute cells into the minute and hour
// rollups with one read-modify-write per distinct cell.
func (w *batchWriter) flushRollups() error {
	hours := make(map[rollupCell]*agg, len(w.rollups))
	minutes := map[string]rollupBucket{}
	for cell, a := range w.rollups {
		if err := w.mergeCell(w.tx.Bucket(bucketMinute), minutes, cell, *a); err != nil {
			return err
		}
		hc := rollupCell{cell.device, cell.metric, cell.minute - cell.minute%hourMs}
		h := hours[hc]
		if h == nil {
			h = w.newAgg()
			hours[hc] = h
		}
		h.merge(*a)
	}
	hourBuckets := make(map[string]rollupBucket, len(minutes))
	for cell, a := range hours {
		if err := w.mergeCell(w.tx.Bucket(bucketHour), hourBuckets, cell, *a); err != nil {
			return err
		}
	}
	return nil
}

// rollupBucket is a device's rollup bucket with a cursor for the lookups: a
// Seek reuses the cursor's stack where each Get allocates a new one.
type rollupBucket struct {
	b *bolt.Bucket
	c *bolt.Cursor
}

// mergeCell adds a to the stored cell. The key is built in scratch: bbolt
// copies keys on Put.
func (w *batchWriter) mergeCell(parent *bolt.Bucket, cache map[string]rollupBucket, cell rollupCell, a agg) error {
	rb, ok := cache[cell.device]
	if !ok {
		b, err := parent.CreateBucketIfNotExists([]byte(cell.device))
		if err != nil {
			return err
		}
		rb = rollupBucket{b, b.Cursor()}
		cache[cell.device] = rb
	}
	w.scratch = appendRollupKey(w.scratch[:0], cell.metric, cell.minute)
	// The cursor seeks from the bucket's root, so earlier puts do not matter.
	if k, old := rb.c.Seek(w.scratch); bytes.Equal(k, w.scratch) {
		o, err := decodeAgg(old)
		if err != nil {
			return err
		}
		o.merge(a)
		a = o
	}
	w.val = a.append(w.val[:0])
	return rb.b.Put(w.scratch, w.keep(w.val))
}

// newestKeys keeps, per device, a reading key that no stored reading of the
// device exceeds, so that Ingest looks up only readings that could be
// redeliveries. Only Ingest adds readings (retention only deletes, which
// keeps a bound true), and it raises the bounds inside its transaction:
// a bound can be too high, never too low.
type newestKeys struct {
	mu sync.Mutex
	m  map[string][16]byte
}

func (n *newestKeys) get(dev string) ([16]byte, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	k, ok := n.m[dev]
	return k, ok
}

func (n *newestKeys) raise(keys map[string][16]byte) {
	if len(keys) == 0 {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.m == nil || len(n.m)+len(keys) > maxCachedDevices {
		n.m = make(map[string][16]byte, len(keys))
	}
	for dev, k := range keys {
		if old, ok := n.m[dev]; !ok || bytes.Compare(k[:], old[:]) > 0 {
			n.m[dev] = k
		}
	}
}

// deviceCache keeps the decoded records of devices the writer touched, each
// with the bytes it was decoded from: a batch's device whose stored record
// is still those bytes needs no JSON decoding. Anything else that writes a
// device record changes its bytes, which is all the invalidation it needs.
// Cached devices are never changed: users copy them first.
type deviceCache struct {
	mu sync.Mutex
	m  map[string]cachedDevice
}

type cachedDevice struct {
	raw []byte
	d   *Device
}

// maxCachedDevices bounds the cache; past it, it starts over.
const maxCachedDevices = 4096

func (c *deviceCache) get(id string, raw []byte) *Device {
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.m[id]; ok && bytes.Equal(e.raw, raw) {
		return e.d
	}
	return nil
}

// update records what a committed transaction wrote.
func (c *deviceCache) update(written []cachedDevice) {
	if len(written) == 0 {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil || len(c.m)+len(written) > maxCachedDevices {
		c.m = make(map[string]cachedDevice, len(written))
	}
	for _, e := range written {
		c.m[e.d.ID] = e
	}
}
