package store

import (
	"cmp"
	"slices"
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
// buffers) and shared by every reader: the changes Outbox returns, and
// their Readings, must not be changed. Other kinds, rare, are kept encoded
// and decoded per read, so their documents and maps are the caller's own.
type outboxTail struct {
	maxBytes, maxEntries int // maxBytes <= 0: disabled

	mu      sync.Mutex
	entries tailBatch // entries.cs[i].Seq == entries.cs[0].Seq + i
	bytes   int
	trimmed uint64 // entries up to here were deleted from the bucket

	// The log of the write transaction in progress. Only the holder of
	// bbolt's writer lock touches these; the handler gets the log itself.
	// tx keeps the previous transaction alive, so a new one cannot reuse
	// its address and be taken for it.
	tx  *bolt.Tx
	log *tailLog
}

// tailBatch is entries in two parallel slices, so that a run of readings
// entries is handed out as it is held, without a copy. Elements are never
// written once appended: appends go past every range handed out, drops
// only reslice, and compaction copies to a new array.
type tailBatch struct {
	cs   []Change // Seq and Kind always; for readings the whole change
	info []tailInfo
}

type tailInfo struct {
	raw  []byte // other kinds than readings: the encoding
	size int    // the encoding's length, which Outbox's maxBytes counts
}

func (b *tailBatch) len() int { return len(b.cs) }

// sorted orders the batch by sequence: Ingest takes a device's readings
// entry's sequence at its first reading and records the entry when it
// closes it, after entries with later sequences.
func (b tailBatch) sorted() tailBatch {
	if slices.IsSortedFunc(b.cs, func(x, y Change) int { return cmp.Compare(x.Seq, y.Seq) }) {
		return b
	}
	idx := make([]int, len(b.cs))
	for i := range idx {
		idx[i] = i
	}
	slices.SortFunc(idx, func(x, y int) int { return cmp.Compare(b.cs[x].Seq, b.cs[y].Seq) })
	out := tailBatch{cs: make([]Change, len(idx)), info: make([]tailInfo, len(idx))}
	for i, j := range idx {
		out.cs[i], out.info[i] = b.cs[j], b.info[j]
	}
	return out
}

func (b *tailBatch) append(c Change, i tailInfo) {
	b.cs = append(b.cs, c)
	b.info = append(b.info, i)
}

// tailLog is what one transaction appended, with slabs for the readings
// and metrics it copied.
type tailLog struct {
	entries  tailBatch
	readings []Reading
	metrics  []Metric
}

// tailOverhead approximates what an entry costs beyond its encoding (the
// Change, its Reading and metrics, the strings they keep alive), for the
// byte bound.
const tailOverhead = 256

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
		// Sized for as many entries as the last transaction had (up to
		// 256, as the tail may keep the array): the writer's batches are
		// much alike, and a slice grown to 100 entries copied them 7 times.
		n := 0
		if t.log != nil {
			n = min(t.log.entries.len(), 256)
		}
		l := &tailLog{entries: tailBatch{cs: make([]Change, 0, n), info: make([]tailInfo, 0, n)}}
		t.tx, t.log = tx, l
		tx.OnCommit(func() { t.add(l.entries.sorted()) })
	}
	l := t.log
	info := tailInfo{size: len(v)}
	if c.Kind != ChangeReadings {
		info.raw = append([]byte(nil), v...)
		l.entries.append(Change{Seq: c.Seq, Kind: c.Kind}, info)
		return
	}
	// Copy as decodeChange would decode: ReceiveTS is not encoded, and a
	// reading without metrics decodes with nil Metrics.
	n := len(c.Readings)
	if len(l.readings)+n > cap(l.readings) {
		l.readings = make([]Reading, 0, slabCap(n, cap(l.readings), 256))
	}
	start := len(l.readings)
	for i := range c.Readings {
		r := &c.Readings[i]
		var ms []Metric
		if m := len(r.Metrics); m > 0 {
			if len(l.metrics)+m > cap(l.metrics) {
				l.metrics = make([]Metric, 0, slabCap(m, cap(l.metrics), 1024))
			}
			k := len(l.metrics)
			l.metrics = append(l.metrics, r.Metrics...)
			ms = l.metrics[k:len(l.metrics):len(l.metrics)]
		}
		l.readings = append(l.readings, Reading{TS: r.TS, ID: r.ID, Metrics: ms})
	}
	l.entries.append(Change{Seq: c.Seq, Kind: c.Kind, Device: c.Device, Stamp: c.Stamp, By: c.By,
		Readings: l.readings[start:len(l.readings):len(l.readings)]}, info)
}

// slabCap sizes the next slab of a transaction's copies: what is needed
// now, doubling with each slab up to limit. A transaction of one entry
// (a quiet edge commits every message alone) then pins no more than it
// holds, and a large one wastes at most about half of its last slab.
func slabCap(need, last, limit int) int {
	return max(need, min(2*last, limit))
}

// add appends what a committed transaction wrote (its commit handler).
func (t *outboxTail) add(es tailBatch) {
	t.mu.Lock()
	defer t.mu.Unlock()
	skip := 0
	for skip < es.len() && es.cs[skip].Seq <= t.trimmed {
		skip++
	}
	if skip == es.len() {
		return
	}
	first := es.cs[skip].Seq
	if n := t.entries.len(); n > 0 {
		hi := t.entries.cs[n-1].Seq
		switch {
		case first <= hi:
			return // a transaction older than the tail: already superseded
		case first != hi+1:
			t.reset() // a later transaction's fill came first: start over
		}
	}
	for i := skip; i < es.len(); i++ {
		if n := t.entries.len(); n > 0 && es.cs[i].Seq != t.entries.cs[n-1].Seq+1 {
			// An entry appended without appendOutbox would leave a hole the
			// tail must not paper over.
			t.reset()
		}
		t.entries.append(es.cs[i], es.info[i])
		t.bytes += es.info[i].size + tailOverhead
	}
	drop := 0
	for drop < t.entries.len() && (t.bytes > t.maxBytes || t.entries.len()-drop > t.maxEntries) {
		t.bytes -= t.entries.info[drop].size + tailOverhead
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
	for drop < t.entries.len() && t.entries.cs[drop].Seq <= seq {
		t.bytes -= t.entries.info[drop].size + tailOverhead
		drop++
	}
	t.dropFront(drop)
}

// dropFront removes the first n entries. The arrays are copied once half
// of them is dead, so dropped entries do not pin memory for long.
func (t *outboxTail) dropFront(n int) {
	if n == 0 {
		return
	}
	if n == t.entries.len() {
		t.reset()
		return
	}
	e := &t.entries
	e.cs, e.info = e.cs[n:], e.info[n:]
	if len(e.cs) < cap(e.cs)/2 {
		e.cs = append(make([]Change, 0, 2*len(e.cs)), e.cs...)
		e.info = append(make([]tailInfo, 0, 2*len(e.info)), e.info...)
	}
}

func (t *outboxTail) reset() {
	t.entries, t.bytes = tailBatch{}, 0
}

// read serves Outbox(after, max, maxBytes) when the tail holds the entry
// after after; ok is false when bbolt must answer. A run of readings
// entries is the tail's own memory; any other kind makes it a copy.
func (t *outboxTail) read(after uint64, max, maxBytes int) (out []Change, ok bool, err error) {
	if t.maxBytes <= 0 || max <= 0 {
		return nil, false, nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.entries.len() == 0 {
		return nil, false, nil
	}
	lo, hi := t.entries.cs[0].Seq, t.entries.cs[t.entries.len()-1].Seq
	if after+1 < lo || after+1 > hi {
		return nil, false, nil
	}
	i0 := int(after + 1 - lo)
	cs, info := t.entries.cs[i0:], t.entries.info[i0:]
	n, size, raw := 0, 0, false
	for n < len(cs) && n < max {
		if n > 0 && size+info[n].size > maxBytes {
			break
		}
		size += info[n].size
		raw = raw || info[n].raw != nil
		n++
	}
	if !raw {
		return cs[:n:n], true, nil
	}
	out = make([]Change, n)
	for i := range out {
		if info[i].raw == nil {
			out[i] = cs[i]
			continue
		}
		if out[i], err = decodeChange(cs[i].Seq, info[i].raw); err != nil {
			return nil, true, err
		}
	}
	return out, true, nil
}

// hi is the last sequence the tail holds, 0 when empty (for tests).
func (t *outboxTail) hi() uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.entries.len() == 0 {
		return 0
	}
	return t.entries.cs[t.entries.len()-1].Seq
}
