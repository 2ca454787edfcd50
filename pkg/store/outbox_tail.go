package store

import (
	"sync"

	bolt "go.etcd.io/bbolt"
)

// outboxTail is a bounded in-memory copy of the outbox entries appended
// most recently, so that the readers that follow the head (the rule runner
// after every commit, the syncer while it keeps up) read them without a
// bbolt transaction and without decoding them again.
//
// It holds entries seq lo..hi with no gap, each exactly as committed and
// still in the outbox bucket. It is filled by a transaction's commit
// handler (bbolt's Tx.OnCommit), so a transaction that fails or rolls back
// leaves nothing in it; it drops entries as trimOutbox deletes them. bbolt
// runs commit handlers after releasing its writer lock, so the handlers of
// two transactions may run in either order: a fill older than the tail is
// ignored, a fill that leaves a gap starts the tail over, and a fill of
// entries a trim already deleted (trimmed) is refused. A reader that runs
// between a commit and its handler sees the state just before that
// commit: every answer is one that bbolt gave at some moment.
//
// Readings are copied out of the transaction (the ingest batch reuses its
// buffers) and shared by every reader: the slices Outbox returns must not
// be changed. Other kinds, rare, are kept encoded and decoded per read, so
// their documents and maps are the caller's own.
type outboxTail struct {
	maxBytes, maxEntries int // maxBytes <= 0: disabled

	mu      sync.Mutex
	entries []tailEntry // entries[i].c.Seq == entries[0].c.Seq + i
	bytes   int
	trimmed uint64 // entries up to here were deleted from the bucket

	// The log of the write transaction in progress. Only the holder of
	// bbolt's writer lock touches these; the handler gets the log itself.
	// tx keeps the previous transaction alive, so a new one cannot reuse
	// its address and be taken for it.
	tx  *bolt.Tx
	log *tailLog
}

type tailEntry struct {
	c    Change // Seq always; for readings the whole change
	raw  []byte // other kinds: the encoding
	size int    // the encoding's length, which Outbox's maxBytes counts
}

// tailLog is what one transaction appended, with slabs for the readings
// and metrics it copied.
type tailLog struct {
	entries  []tailEntry
	readings []Reading
	metrics  []Metric
}

// tailOverhead approximates what an entry costs beyond its encoding (the
// Change, its Reading and slice headers), for the byte bound.
const tailOverhead = 160

// Default bounds: about a second of ingest at full rate.
const (
	defaultOutboxTailBytes = 4 << 20
	maxOutboxTailEntries   = 1 << 16
)

func newOutboxTail(maxBytes int) *outboxTail {
	return &outboxTail{maxBytes: maxBytes, maxEntries: maxOutboxTailEntries}
}

// record notes an entry written in tx, to be added to the tail if tx
// commits. The caller holds the write transaction; v is c's encoding.
func (t *outboxTail) record(tx *bolt.Tx, c *Change, v []byte) {
	if t.maxBytes <= 0 {
		return
	}
	if t.tx != tx {
		l := &tailLog{}
		t.tx, t.log = tx, l
		tx.OnCommit(func() { t.add(l.entries) })
	}
	l := t.log
	e := tailEntry{c: Change{Seq: c.Seq, Kind: c.Kind}, size: len(v)}
	if c.Kind != ChangeReadings {
		e.raw = append([]byte(nil), v...)
		l.entries = append(l.entries, e)
		return
	}
	// Copy as decodeChange would decode: ReceiveTS is not encoded, and a
	// reading without metrics decodes with nil Metrics.
	e.c.Device, e.c.Stamp, e.c.By = c.Device, c.Stamp, c.By
	n := len(c.Readings)
	if len(l.readings)+n > cap(l.readings) {
		l.readings = make([]Reading, 0, max(n, 256))
	}
	start := len(l.readings)
	for i := range c.Readings {
		r := &c.Readings[i]
		var ms []Metric
		if m := len(r.Metrics); m > 0 {
			if len(l.metrics)+m > cap(l.metrics) {
				l.metrics = make([]Metric, 0, max(m, 1024))
			}
			k := len(l.metrics)
			l.metrics = append(l.metrics, r.Metrics...)
			ms = l.metrics[k:len(l.metrics):len(l.metrics)]
		}
		l.readings = append(l.readings, Reading{TS: r.TS, ID: r.ID, Metrics: ms})
	}
	e.c.Readings = l.readings[start:len(l.readings):len(l.readings)]
	l.entries = append(l.entries, e)
}

// add appends what a committed transaction wrote (its commit handler).
func (t *outboxTail) add(es []tailEntry) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for len(es) > 0 && es[0].c.Seq <= t.trimmed {
		es = es[1:]
	}
	if len(es) == 0 {
		return
	}
	if n := len(t.entries); n > 0 {
		hi := t.entries[n-1].c.Seq
		switch {
		case es[0].c.Seq <= hi:
			return // a transaction older than the tail: already superseded
		case es[0].c.Seq != hi+1:
			t.reset() // a later transaction's fill came first: start over
		}
	}
	for _, e := range es {
		t.entries = append(t.entries, e)
		t.bytes += e.size + tailOverhead
	}
	drop := 0
	for drop < len(t.entries) && (t.bytes > t.maxBytes || len(t.entries)-drop > t.maxEntries) {
		t.bytes -= t.entries[drop].size + tailOverhead
		drop++
	}
	t.dropFront(drop)
}

// trim drops the entries up to seq, which a committed transaction deleted
// from the bucket.
func (t *outboxTail) trim(seq uint64) {
	if t.maxBytes <= 0 {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.trimmed = max(t.trimmed, seq)
	drop := 0
	for drop < len(t.entries) && t.entries[drop].c.Seq <= seq {
		t.bytes -= t.entries[drop].size + tailOverhead
		drop++
	}
	t.dropFront(drop)
}

// dropFront removes the first n entries. The backing array is copied once
// half of it is dead, so dropped entries do not pin memory for long.
func (t *outboxTail) dropFront(n int) {
	if n == 0 {
		return
	}
	if n == len(t.entries) {
		t.reset()
		return
	}
	t.entries = t.entries[n:]
	if len(t.entries) < cap(t.entries)/2 {
		t.entries = append(make([]tailEntry, 0, 2*len(t.entries)), t.entries...)
	}
}

func (t *outboxTail) reset() {
	t.entries, t.bytes = nil, 0
}

// read serves Outbox(after, max, maxBytes) when the tail holds the entry
// after after; ok is false when bbolt must answer.
func (t *outboxTail) read(after uint64, max, maxBytes int) (out []Change, ok bool, err error) {
	if t.maxBytes <= 0 || max <= 0 {
		return nil, false, nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.entries) == 0 {
		return nil, false, nil
	}
	lo, hi := t.entries[0].c.Seq, t.entries[len(t.entries)-1].c.Seq
	if after+1 < lo || after+1 > hi {
		return nil, false, nil
	}
	es := t.entries[after+1-lo:]
	n, size := 0, 0
	for n < len(es) && n < max {
		if n > 0 && size+es[n].size > maxBytes {
			break
		}
		size += es[n].size
		n++
	}
	out = make([]Change, n)
	for i := range out {
		e := &es[i]
		if e.raw == nil {
			out[i] = e.c
			continue
		}
		if out[i], err = decodeChange(e.c.Seq, e.raw); err != nil {
			return nil, true, err
		}
	}
	return out, true, nil
}

// hi is the last sequence the tail holds, 0 when empty (for tests).
func (t *outboxTail) hi() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.entries) == 0 {
		return 0
	}
	return t.entries[len(t.entries)-1].c.Seq
}
