package store

import (
	"encoding/json"
	"fmt"

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
	err := s.db.Update(func(tx *bolt.Tx) error {
		head = getU64(tx.Bucket(bucketMeta).Get(keyOutboxHead))
		w := batchWriter{
			s: s, tx: tx,
			readings: tx.Bucket(bucketReadings), ids: tx.Bucket(bucketIDs),
			rbs: map[string]*bolt.Bucket{}, ibs: map[string]*bolt.Bucket{},
			devices: map[string]*Device{}, rollups: map[rollupCell]*agg{},
		}
		for i := range items {
			r, err := w.item(&items[i], &head)
			if err != nil {
				return fmt.Errorf("device %s: %w", items[i].Device, err)
			}
			results[i] = r
			newReadings += uint64(r.Stored)
		}
		for _, d := range w.devices {
			if err := putDevice(tx, d); err != nil {
				return err
			}
		}
		newDevices = w.newDevices
		if err := w.flushRollups(); err != nil {
			return err
		}
		var err error
		if deadCount, err = s.putDeadLetters(tx, dead); err != nil {
			return fmt.Errorf("dead letters: %w", err)
		}
		return s.commitMeta(tx, head, newReadings, newDevices)
	})
	if err != nil {
		return nil, fmt.Errorf("ingest batch of %d: %w", len(items), err)
	}
	storeMax(&s.outboxHead, head)
	s.readings.Add(newReadings)
	s.devices.Add(newDevices)
	s.deadCount.Store(deadCount)
	return results, nil
}

type rollupCell struct {
	device, metric string
	minute         int64
}

// batchWriter carries per-transaction caches so that a batch touching the
// same device many times opens its buckets and decodes its record once.
type batchWriter struct {
	s          *Store
	tx         *bolt.Tx
	readings   *bolt.Bucket
	ids        *bolt.Bucket
	rbs, ibs   map[string]*bolt.Bucket
	devices    map[string]*Device
	rollups    map[rollupCell]*agg
	newDevices uint64
	scratch    []byte
	val        []byte
	fresh      []Reading // the item's new readings; encoded into the outbox entry, then reused
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

func (w *batchWriter) device(id string, now int64) (*Device, error) {
	if d, ok := w.devices[id]; ok {
		return d, nil
	}
	d, err := getDevice(w.tx, id)
	if err == ErrNotFound {
		d = w.s.newDevice(id, now)
		w.newDevices++
	} else if err != nil {
		return nil, err
	}
	w.devices[id] = d
	return d, nil
}

func (w *batchWriter) item(it *Item, head *uint64) (ItemResult, error) {
	var res ItemResult
	d, err := w.device(it.Device, it.ReceivedAt)
	if err != nil {
		return res, err
	}
	if it.ReceivedAt > d.LastSeen {
		d.LastSeen = it.ReceivedAt
	}
	if len(it.Readings) > 0 {
		if res, err = w.readingsOf(it, head); err != nil {
			return res, err
		}
	}
	if len(it.State) > 0 {
		delta := shadow.Patch(it.State, w.s.clock.Now())
		if changed := d.Reported.Merge(delta); len(changed) > 0 {
			res.StateChanged = true
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
		if rb.Get(key[:]) != nil {
			res.Duplicates++
			continue
		}
		w.val = encodeReadingValue(w.val[:0], seq, r.ID, w.scratch)
		// bbolt keeps references to keys and values until commit; one
		// copy of the key serves both puts, as neither is modified.
		k := append([]byte(nil), key[:]...)
		if err := rb.Put(k, append([]byte(nil), w.val...)); err != nil {
			return res, err
		}
		if ib != nil {
			if err := ib.Put([]byte(r.ID), k); err != nil {
				return res, err
			}
		}
		minute := r.TS - r.TS%minuteMs
		for _, m := range r.Metrics {
			cell := rollupCell{it.Device, m.Name, minute}
			a := w.rollups[cell]
			if a == nil {
				a = new(agg)
				w.rollups[cell] = a
			}
			a.add(m.Value)
		}
		fresh = append(fresh, *r)
		res.Stored++
	}
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

// flushRollups folds the batch's per-minute cells into the minute and hour
// rollups with one read-modify-write per distinct cell.
func (w *batchWriter) flushRollups() error {
	hours := map[rollupCell]*agg{}
	for cell, a := range w.rollups {
		if err := mergeCell(w.tx.Bucket(bucketMinute), cell.device, rollupKey(cell.metric, cell.minute), *a); err != nil {
			return err
		}
		hc := rollupCell{cell.device, cell.metric, cell.minute - cell.minute%hourMs}
		h := hours[hc]
		if h == nil {
			h = new(agg)
			hours[hc] = h
		}
		h.merge(*a)
	}
	for cell, a := range hours {
		if err := mergeCell(w.tx.Bucket(bucketHour), cell.device, rollupKey(cell.metric, cell.minute), *a); err != nil {
			return err
		}
	}
	return nil
}

func mergeCell(parent *bolt.Bucket, device string, key []byte, a agg) error {
	b, err := parent.CreateBucketIfNotExists([]byte(device))
	if err != nil {
		return err
	}
	if old := b.Get(key); old != nil {
		o, err := decodeAgg(old)
		if err != nil {
			return err
		}
		o.merge(a)
		a = o
	}
	return b.Put(key, a.encode())
}
