package fsm

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"slices"
	"sort"

	bolt "go.etcd.io/bbolt"
)

// Staging keeps many small pushes from costing a B-tree page each.
//
// The readings bucket is keyed by device, so one-reading pushes from 64
// devices touch 64 leaf pages per transaction, and bbolt decodes, re-encodes
// and writes every page it touches: in a benchmark of group-committed
// one-reading pushes that was 85 % of the apply cost. Readings of small
// changes are instead appended to readings_recent under their raft index,
// which touches one page, and moved under their devices in bulk once
// stageFlushAt of them have gathered, each device's page then taking many
// readings at once.
//
// Where a reading lives is invisible: dedup checks both places, Readings
// merges both in key order, and the keys are the same in both. So when the
// move happens is a local matter (replicas may differ in layout, never in
// answers), and a snapshot carries the staged readings with the rest.
const (
	// defaultStageMax is the largest change (in readings) that is staged;
	// larger ones already fill pages and go straight in.
	defaultStageMax = 8
	// defaultStageFlushAt is how many staged readings trigger the move.
	// Readings scans the staged readings of every device, so this bounds
	// its extra cost as well as the memory of the dedup index.
	defaultStageFlushAt = 4096
)

// stageIndex is the in-memory dedup index of the staged readings, rebuilt
// from readings_recent on open and restore.
type stageIndex struct {
	keys map[string]struct{} // reading keys (device 0 ts edge 0 id)
	// newest is each staged device's greatest staged key: with the
	// bucket's last key of the device, the bound above which a reading
	// needs no lookup (see newestKeys).
	newest map[string]string
	n      int

	max, flushAt int // the limits above; tests lower them
}

func (s *stageIndex) reset() {
	s.keys, s.newest, s.n = map[string]struct{}{}, map[string]string{}, 0
}

func (s *stageIndex) add(device string, key []byte) {
	s.keys[string(key)] = struct{}{}
	if cur, ok := s.newest[device]; !ok || string(key) > cur {
		s.newest[device] = string(key)
	}
	s.n++
}

func (s *stageIndex) hasKey(key []byte) bool { _, ok := s.keys[string(key)]; return ok }

func (s *stageIndex) load(b *bolt.Bucket) error {
	s.reset()
	return b.ForEach(func(k, v []byte) error {
		sr, err := decodeStaged(v)
		if err != nil {
			return fmt.Errorf("staged reading %x: %w", k, err)
		}
		s.add(sr.device, sr.key)
		return nil
	})
}

// stagedReading is one record of readings_recent: the reading's key in the
// readings bucket and its stored metrics, plus its device, which is derived
// from the key rather than stored.
type stagedReading struct {
	key, metrics []byte
	device       string
}

func encodeStaged(key, metrics []byte) []byte {
	b := make([]byte, 0, len(key)+len(metrics)+2)
	b = binary.AppendUvarint(b, uint64(len(key)))
	b = append(b, key...)
	return append(b, metrics...)
}

func decodeStaged(v []byte) (stagedReading, error) {
	sr, err := splitStaged(v)
	if err != nil {
		return sr, err
	}
	device, _, _, _, ok := splitReadingKey(sr.key)
	if !ok {
		return sr, ErrCorrupt
	}
	sr.device = device
	return sr, nil
}

// splitStaged undoes encodeStaged: the readings key and the metrics.
func splitStaged(v []byte) (stagedReading, error) {
	r := reader{b: v}
	sr := stagedReading{key: r.bytes()}
	if r.err != nil {
		return sr, ErrCorrupt
	}
	sr.metrics = r.b
	return sr, nil
}

// stageReadings stages a small change's readings that are not already
// stored (in either place), marking the others in dup.
func (a *applier) stageReadings(origin string, dev *Device, c *rawChange, dup []bool) error {
	a.bk.recent.FillPercent = 1 // keyed by raft index: appended in order
	for i, r := range c.Readings {
		key := readingKey(make([]byte, 0, len(dev.ID)+len(origin)+len(r.ID)+11), dev.ID, r.TS, origin, r.ID)
		if dup[i] = a.stored(dev.ID, key); dup[i] {
			continue
		}
		k := binary.BigEndian.AppendUint32(u64(a.index), a.stageSub)
		a.stageSub++
		if err := a.bk.recent.Put(k, encodeStaged(key, r.Metrics)); err != nil {
			return err
		}
		a.stage.add(dev.ID, key)
	}
	return nil
}

// flushStage moves every staged reading under its device, in key order, and
// empties the stage. A staged reading with an id gets no reading_id entry:
// its key identifies it (DESIGN.md, invariant 4).
func (a *applier) flushStage() error {
	rs := make([]stagedReading, 0, a.stage.n)
	err := a.bk.recent.ForEach(func(_, v []byte) error {
		sr, err := splitStaged(v)
		rs = append(rs, sr)
		return err
	})
	if err != nil {
		return fmt.Errorf("flush staged readings: %w", err)
	}
	slices.SortFunc(rs, func(x, y stagedReading) int { return bytes.Compare(x.key, y.key) })
	a.bk.readings.FillPercent = readingsFill
	for _, sr := range rs {
		if err := a.bk.readings.Put(sr.key, sr.metrics); err != nil {
			return err
		}
	}
	if err := a.tx.DeleteBucket(bktRecent); err != nil {
		return err
	}
	if a.bk.recent, err = a.tx.CreateBucket(bktRecent); err != nil {
		return err
	}
	a.stage.reset()
	return nil
}

// stagedFor returns the staged readings of the device whose key has prefix,
// from seek on, in key order.
func stagedFor(tx *bolt.Tx, prefix, seek []byte) ([]stagedReading, error) {
	var out []stagedReading
	err := tx.Bucket(bktRecent).ForEach(func(_, v []byte) error {
		sr, err := splitStaged(v)
		if err == nil && bytes.HasPrefix(sr.key, prefix) && bytes.Compare(sr.key, seek) >= 0 {
			out = append(out, sr)
		}
		return err
	})
	sort.Slice(out, func(i, j int) bool { return bytes.Compare(out[i].key, out[j].key) < 0 })
	return out, err
}
