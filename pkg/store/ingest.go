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
// timestamp and values, are skipped), rollups, the device registry, and the
// outbox entries: per device one of its new readings (see maxEntryReadings),
// and one per state change. The rule runner's saves ride the same commit
// (each as SaveRuleEvents would save it, with one trim chunk:
// OutboxTrimPending). When it returns nil the batch is durable.
func (s *Store) Ingest(items []Item, dead []DeadLetter, saves ...RuleSave) ([]ItemResult, error) {
	results := make([]ItemResult, len(items))
	var newReadings, newDevices, deadCount uint64
	trimmed := true
	head := s.outboxHead.Load()
	var written []cachedDevice
	err := s.db.Update(func(tx *bolt.Tx) error {
		head = getU64(tx.Bucket(bucketMeta).Get(keyOutboxHead))
		written = nil
		// Outbox keys only ever grow: full pages halve the pages a commit
		// writes for it (bbolt's default splits leave them half empty).
		tx.Bucket(bucketOutbox).FillPercent = 1
		w := newBatchWriter(s, tx)
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
		if len(saves) > 0 {
			if trimmed, err = s.putRuleSaves(tx, saves); err != nil {
				return fmt.Errorf("rule saves: %w", err)
			}
		}
		// Raised before the commit: if it fails, the bounds are only too
		// high, which costs lookups, never a missed duplicate.
		s.newest.raise(w.order)
		return s.commitMeta(tx, head, newReadings, newDevices)
	})
	if err != nil {
		return nil, fmt.Errorf("ingest batch of %d: %w", len(items), err)
	}
	if len(saves) > 0 {
		s.trimPending.Store(!trimmed)
	}
	s.devCache.update(written)
	storeMax(&s.outboxHead, head)
	s.readings.Add(newReadings)
	s.devices.Add(newDevices)
	s.deadCount.Store(deadCount)
	return results, nil
}

// flushDevices writes each touched device's readings outbox entry,
// last-seen record, and the JSON record of each device registered or
// changed in this batch. A batch of
// readings alone writes only the small fixed-size records: the JSON record
// and the pages it spans stay untouched.
func (w *batchWriter) flushDevices(written *[]cachedDevice) error {
	for _, db := range w.order {
		if err := w.closeEntry(db); err != nil {
			return err
		}
		w.val = binary.BigEndian.AppendUint64(w.val[:0], uint64(db.seen))
		if err := w.seenB.Put([]byte(db.id), w.keep(w.val)); err != nil {
			return fmt.Errorf("last seen of %s: %w", db.id, err)
		}
		if !db.dirty {
			continue
		}
		db.d.LastSeen = max(db.d.LastSeen, db.seen)
		raw, err := json.Marshal(db.d)
		if err != nil {
			return fmt.Errorf("encode device %s: %w", db.id, err)
		}
		if err := w.tx.Bucket(bucketDevices).Put([]byte(db.id), raw); err != nil {
			return err
		}
		*written = append(*written, cachedDevice{raw: raw, d: db.d})
	}
	return nil
}

// batchWriter carries per-transaction caches so that a batch touching the
// same device many times opens its spans and decodes its record once.
type batchWriter struct {
	s                                          *Store
	tx                                         *bolt.Tx
	readings, ids, seenB, rollMinute, rollHour *bolt.Bucket

	devs  map[string]*devBatch
	order []*devBatch // in the order the batch first touched them
	slots []devBatch  // backs devs (see touch)

	rollups    map[rollupCell]*agg
	aggs       []agg // backs the cells of rollups and of the hours (see newAgg)
	newDevices uint64
	scratch    []byte
	val        []byte
	slab       []byte // backs the values put in this transaction (see keep)
}

// devBatch is what one transaction knows of one device it touched: one map
// lookup per item finds all of it.
type devBatch struct {
	id   string
	seen int64 // last seen: the later of the stored time and the batch's
	// rb and ib are the device's spans of the readings and ids buckets,
	// opened on first use; rc is a cursor on rb for the dedupe lookups: a
	// Seek reuses its stack where each Get allocates a new one.
	rb, ib *span
	rc     *spanCursor
	spans  devSpans // backs rb, ib and rc
	// newest is a key no stored reading of the device exceeds (see
	// newestKeys), known once rb is open.
	newest [16]byte
	// d is the decoded record, once the batch needed it; dirty when the
	// batch must write it (registered, or state changed); shared while its
	// maps are the device cache's, which a state merge must clone first.
	d             *Device
	dirty, shared bool
	rollMinute    rollupBucket // its spans of the minute and hour rollups
	rollHour      rollupBucket
	// out is the readings outbox entry of the device's new readings in
	// this batch, open while out.Seq is set (see openEntry).
	out Change
}

type rollupCell struct {
	dev    *devBatch
	metric string
	minute int64
}

func newBatchWriter(s *Store, tx *bolt.Tx) *batchWriter {
	w := &batchWriter{
		s: s, tx: tx,
		readings: tx.Bucket(bucketReadings), ids: tx.Bucket(bucketIDs), seenB: tx.Bucket(bucketSeen),
		rollMinute: tx.Bucket(bucketMinute), rollHour: tx.Bucket(bucketHour),
		devs: map[string]*devBatch{}, rollups: map[rollupCell]*agg{},
	}
	// Each device's keys grow at the end of its span, so a page that
	// splits is never added to again: fuller pages are fewer pages to write.
	for _, b := range []*bolt.Bucket{w.readings, w.ids, w.rollMinute, w.rollHour} {
		b.FillPercent = 0.9
	}
	return w
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

// device decodes the record of a device, registering it if unknown.
func (w *batchWriter) device(db *devBatch, now int64) error {
	if db.d != nil {
		return nil
	}
	raw := w.tx.Bucket(bucketDevices).Get([]byte(db.id))
	switch {
	case raw == nil:
		db.d = w.s.newDevice(db.id, now)
		w.newDevices++
		db.dirty = true
	default:
		if c := w.s.devCache.get(db.id, raw); c != nil {
			cp := *c
			db.d, db.shared = &cp, true
			break
		}
		d := new(Device)
		if err := json.Unmarshal(raw, d); err != nil {
			return fmt.Errorf("decode device %s: %w", db.id, err)
		}
		db.d = d
	}
	return nil
}

// touch records that a device was seen at at, registering it if unknown.
// A device with a last-seen record is registered; one without is new, or
// was registered by an API write, the cloud or an edge that kept last_seen
// only in the JSON record, which then still holds it.
func (w *batchWriter) touch(id string, at int64) (*devBatch, error) {
	if db, ok := w.devs[id]; ok {
		db.seen = max(db.seen, at)
		return db, nil
	}
	if len(w.slots) == cap(w.slots) {
		w.slots = make([]devBatch, 0, 64) // never grown: devs points into it
	}
	w.slots = append(w.slots, devBatch{id: id})
	db := &w.slots[len(w.slots)-1]
	w.devs[id] = db
	w.order = append(w.order, db)
	if v := w.seenB.Get([]byte(id)); v != nil {
		db.seen = max(int64(getU64(v)), at)
		return db, nil
	}
	if err := w.device(db, at); err != nil {
		return nil, err
	}
	db.seen = max(db.d.LastSeen, at)
	return db, nil
}

func (w *batchWriter) item(it *Item, head *uint64) (ItemResult, error) {
	var res ItemResult
	db, err := w.touch(it.Device, it.ReceivedAt)
	if err != nil {
		return res, err
	}
	if len(it.Readings) > 0 {
		if res, err = w.readingsOf(db, it, head); err != nil {
			return res, err
		}
	}
	if len(it.State) > 0 {
		if err := w.device(db, it.ReceivedAt); err != nil {
			return res, err
		}
		if db.shared {
			db.d.Reported = db.d.Reported.Clone()
			db.shared = false
		}
		delta := shadow.Patch(it.State, w.s.clock.Now())
		if changed := db.d.Reported.Merge(delta); len(changed) > 0 {
			res.StateChanged = true
			db.dirty = true
			c := Change{Kind: ChangeReported, Device: it.Device, Stamp: delta.Version(), Doc: delta}
			if err := w.s.appendOutbox(w.tx, head, &c); err != nil {
				return res, err
			}
		}
	}
	return res, nil
}

// openReadings opens the device's readings span and learns its bound.
func (w *batchWriter) openReadings(db *devBatch) {
	db.rb = db.spans.open(db.id, w.readings, &db.spans.readings, &db.spans.readingsC)
	db.rc = &db.spans.readingsC
	var ok bool
	if db.newest, ok = w.s.newest.get(db.id); !ok {
		// First batch of the device since the store opened.
		if k, _ := db.rc.Last(); k != nil {
			copy(db.newest[:], k)
		}
	}
}

func (w *batchWriter) readingsOf(db *devBatch, it *Item, head *uint64) (ItemResult, error) {
	var res ItemResult
	if db.rb == nil {
		w.openReadings(db)
	}
	if db.out.Seq != 0 && len(db.out.Readings)+len(it.Readings) > maxEntryReadings {
		if err := w.closeEntry(db); err != nil {
			return res, err
		}
	}
	for i := range it.Readings {
		r := &it.Readings[i]
		w.scratch = appendMetrics(w.scratch[:0], r.Metrics)
		key := readingKey(r, w.scratch)
		withID := r.ID != "" && r.ReceiveTS
		if withID {
			if db.ib == nil {
				db.ib = db.spans.open(db.id, w.ids, &db.spans.ids, nil)
			}
			if db.ib.Get([]byte(r.ID)) != nil {
				res.Duplicates++
				continue
			}
		}
		// A key above every stored one cannot be a duplicate: devices send
		// in time order, so most readings need no lookup. The cursor seeks
		// from the bucket's root each time, so the puts since its last use
		// do not matter.
		if bytes.Compare(key[:], db.newest[:]) <= 0 {
			if k, _ := db.rc.Seek(key[:]); bytes.Equal(k, key[:]) {
				res.Duplicates++
				continue
			}
		} else {
			db.newest = key
		}
		if db.out.Seq == 0 {
			w.openEntry(db, head)
		}
		w.val = encodeReadingValue(w.val[:0], db.out.Seq, r.ID, w.scratch)
		if err := db.rb.Put(key[:], w.keep(w.val)); err != nil {
			return res, err
		}
		if withID {
			if err := db.ib.Put([]byte(r.ID), w.keep(key[:])); err != nil {
				return res, err
			}
		}
		minute := r.TS - r.TS%minuteMs
		for _, m := range r.Metrics {
			cell := rollupCell{db, m.Name, minute}
			a := w.rollups[cell]
			if a == nil {
				a = w.newAgg()
				w.rollups[cell] = a
			}
			a.add(m.Value)
		}
		db.out.Readings = append(db.out.Readings, *r)
		res.Stored++
	}
	return res, nil
}

// maxEntryReadings bounds the readings one outbox entry gathers from the
// items of a batch (an item with more travels alone, as before): the
// syncer sends at least one entry per push, whatever its size.
const maxEntryReadings = 1000

// openEntry starts the device's readings entry of this batch, taking its
// outbox sequence now: the readings put from here on carry it, and the
// entries of later items (state changes, other devices) follow it.
func (w *batchWriter) openEntry(db *devBatch, head *uint64) {
	*head++
	db.out = Change{Seq: *head, Kind: ChangeReadings, Device: db.id, Stamp: w.s.clock.Now(), Readings: db.out.Readings[:0]}
}

// closeEntry writes the device's open readings entry (its sequence was
// taken by openEntry).
func (w *batchWriter) closeEntry(db *devBatch) error {
	if db.out.Seq == 0 {
		return nil
	}
	if err := w.s.putOutbox(w.tx, &db.out); err != nil {
		return fmt.Errorf("outbox entry %d: %w", db.out.Seq, err)
	}
	db.out.Seq = 0 // written, and the tail copied it: the readings' memory may be reused
	return nil
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
	for cell, a := range w.rollups {
		if err := w.mergeCell(w.rollMinute, &cell.dev.rollMinute, cell, *a); err != nil {
			return err
		}
		hc := rollupCell{cell.dev, cell.metric, cell.minute - cell.minute%hourMs}
		h := hours[hc]
		if h == nil {
			h = w.newAgg()
			hours[hc] = h
		}
		h.merge(*a)
	}
	for cell, a := range hours {
		if err := w.mergeCell(w.rollHour, &cell.dev.rollHour, cell, *a); err != nil {
			return err
		}
	}
	return nil
}

// rollupBucket is a device's span of a rollup bucket, opened on first use,
// with a cursor for the lookups: a Seek reuses the cursor's stack where
// each Get allocates a new one.
type rollupBucket struct {
	b span // b.b is nil until opened
	c spanCursor
}

// mergeCell adds a to the stored cell. The key is built in scratch: bbolt
// copies keys on Put.
func (w *batchWriter) mergeCell(parent *bolt.Bucket, rb *rollupBucket, cell rollupCell, a agg) error {
	if rb.b.b == nil {
		cell.dev.spans.open(cell.dev.id, parent, &rb.b, &rb.c)
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

// raise records the bounds of the devices whose readings a batch touched.
func (n *newestKeys) raise(devs []*devBatch) {
	if len(devs) == 0 {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.m == nil || len(n.m)+len(devs) > maxCachedDevices {
		n.m = make(map[string][16]byte, len(devs))
	}
	for _, db := range devs {
		if db.rb == nil {
			continue
		}
		if old, ok := n.m[db.id]; !ok || bytes.Compare(db.newest[:], old[:]) > 0 {
			n.m[db.id] = db.newest
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
