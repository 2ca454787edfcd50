package fsm

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"

	bolt "go.etcd.io/bbolt"

	"github.com/outpost-edge/outpost/pkg/hlc"
)

// Bounded state. The leader proposes CmdCompact on a ticker with a cutoff it
// computed from its own clock; Apply never reads the clock, so every replica
// deletes the same records. One command does a bounded amount of work (at
// most Limit deletions or visited devices) and says in Result.Next where the
// next one resumes, so no raft entry holds the apply goroutine for long; the
// leader proposes the next chunk until Next comes back empty.
//
//   - CompactReadings deletes readings (and the reading_id entries an older
//     version wrote for them) with a timestamp before the cutoff. It first
//     moves the stage into readings, so staged readings are judged like the
//     others. Device records stay.
//   - CompactLog deletes export-log entries that every named sink has taken
//     (sink_cursor) and that are older than the cutoff, oldest first. Log
//     entries carry no reliable time of their own, so every CompactLog
//     command leaves a mark (its index and its leader time) in log_marks:
//     entries before a mark stamped at or before the cutoff are older than
//     it. The last compacted entry is remembered (meta log_compacted) so an
//     export cursor before it is refused with ErrCompacted, not silently
//     skipped.
//   - CompactTombstones drops shadow tombstones stamped before the cutoff
//     (the leader's now − max_offline): an edge away longer does a full
//     resync, so none needs them.

// What a CompactCmd compacts.
const (
	CompactReadings   = "readings"
	CompactLog        = "log"
	CompactTombstones = "tombstones"
)

// CompactCmd is the payload of CmdCompact.
type CompactCmd struct {
	What string `json:"what"`
	// CutoffMs: what is older (readings: ts < CutoffMs; log: applied before
	// a mark stamped ≤ CutoffMs; tombstones: stamped before CutoffMs) goes.
	CutoffMs int64 `json:"cutoff_ms"`
	// After resumes a chunked pass at this device (inclusive); "" starts
	// at the first. The previous chunk's Result.Next.
	After string `json:"after,omitempty"`
	// Limit bounds the chunk's work; 0 or more than maxCompact means
	// maxCompact.
	Limit int `json:"limit,omitempty"`
	// Sinks are the configured export sinks (log): each bounds compaction
	// by its cursor in sink_cursor, and one that has no cursor yet has
	// taken nothing.
	Sinks []string `json:"sinks,omitempty"`
}

// ErrCompacted: an export cursor points before the oldest entry still
// kept; the changes after it were compacted away.
var ErrCompacted = errors.New("export cursor compacted")

// CompactedError is ErrCompacted with the earliest cursor still available.
type CompactedError struct {
	Cursor   string // the cursor that was asked for
	Earliest string // resumes right after the compacted entries
}

func (e *CompactedError) Error() string {
	return fmt.Sprintf("export cursor %q is before the oldest kept change; earliest available cursor is %q", e.Cursor, e.Earliest)
}

func (e *CompactedError) Unwrap() error { return ErrCompacted }

// maxCompact bounds one compaction command, however large a limit it names.
const maxCompact = 10000

var (
	// bktSinkCursor is written by the export sinks: sink name → the raft
	// index (8, big-endian) up to which, inclusive, it took everything.
	// Only read here; it may not exist.
	bktSinkCursor = []byte("sink_cursor")
	// bktLogMarks: index(8) of a CompactLog command → its leader time ms (8).
	bktLogMarks = []byte("log_marks")

	// keyLogCompacted: the last compacted log entry's index (8) and its
	// change count (4).
	keyLogCompacted = []byte("log_compacted")
)

func (a *applier) compact(atMs int64, c *CompactCmd) (Result, error) {
	if c == nil {
		return Result{Err: fmt.Errorf("%w: compaction without a payload", ErrCorrupt)}, nil
	}
	limit := c.Limit
	if limit <= 0 || limit > maxCompact {
		limit = maxCompact
	}
	switch c.What {
	case CompactReadings:
		return a.compactReadings(c.CutoffMs, c.After, limit)
	case CompactLog:
		return a.compactLog(atMs, c.CutoffMs, c.Sinks, limit)
	case CompactTombstones:
		return a.compactTombstones(c.CutoffMs, c.After, limit)
	}
	return Result{Err: fmt.Errorf("%w: compaction of %q", ErrCorrupt, c.What)}, nil
}

// compactReadings deletes, device by device from after, the readings older
// than cutoff. Work is one unit per deletion and per device visited.
func (a *applier) compactReadings(cutoff int64, after string, limit int) (Result, error) {
	// Readings queued by earlier pushes of this transaction (bulk puts) are
	// judged like the rest: put them first.
	if err := a.flushBulk(); err != nil {
		return Result{}, err
	}
	if a.stage.n > 0 {
		if err := a.flushStage(); err != nil {
			return Result{}, err
		}
	}
	var del [][]byte
	next := ""
	work := 0
	c := a.bk.readings.Cursor()
	k, _ := c.Seek([]byte(after))
	for k != nil {
		dev, ts, _, _, ok := splitReadingKey(k)
		if !ok {
			k, _ = c.Next() // not a reading key: not ours to judge
			continue
		}
		if work >= limit {
			next = dev
			break
		}
		work++
		if ts >= cutoff {
			// The rest of this device is newer (keys sort by time within
			// a device): skip to the next device. Ids hold no zero byte,
			// so device+0x01 sorts after every key of this device and
			// before the next device's.
			k, _ = c.Seek(append([]byte(dev), 1))
			continue
		}
		del = append(del, bytes.Clone(k))
		k, _ = c.Next()
	}
	// reading_id holds only what an older version wrote (invariant 4):
	// once it is empty, there is nothing to look for.
	ids, _ := a.bk.readID.Cursor().First()
	for _, k := range del {
		if err := a.bk.readings.Delete(k); err != nil {
			return Result{}, err
		}
		if ids == nil {
			continue
		}
		if dev, _, edge, id, _ := splitReadingKey(k); id != "" {
			if err := a.bk.readID.Delete(idKey(edge, dev, id)); err != nil {
				return Result{}, err
			}
		}
	}
	return Result{Applied: len(del), Next: next}, nil
}

// compactLog records this command's mark and deletes, oldest first, the log
// entries at or below both bounds: the time bound (before the newest mark
// stamped at or before cutoff) and every named sink's cursor.
func (a *applier) compactLog(atMs, cutoff int64, sinks []string, limit int) (Result, error) {
	marks := a.bk.logMarks
	if err := marks.Put(u64(a.index), u64(uint64(atMs))); err != nil {
		return Result{}, err
	}
	// The newest mark at or before the cutoff; older ones are not needed
	// again (a later cutoff only moves forward past them).
	var bound uint64
	var stale [][]byte
	mc := marks.Cursor()
	for k, v := mc.First(); k != nil && int64(getU64(v)) <= cutoff; k, v = mc.Next() {
		if bound != 0 {
			stale = append(stale, u64(bound))
		}
		bound = getU64(k)
	}
	for _, k := range stale {
		if err := marks.Delete(k); err != nil {
			return Result{}, err
		}
	}
	if bound == 0 {
		return Result{}, nil
	}
	bound-- // entries before the mark
	if len(sinks) > 0 {
		sc := a.tx.Bucket(bktSinkCursor)
		for _, s := range sinks {
			var took uint64
			if sc != nil {
				took = getU64(sc.Get([]byte(s)))
			}
			bound = min(bound, took)
		}
	}
	var del [][]byte
	var last uint64
	var lastN uint32
	more := false
	c := a.bk.log.Cursor()
	for k, v := c.First(); k != nil && getU64(k) <= bound; k, v = c.Next() {
		if len(del) == limit {
			more = true
			break
		}
		del = append(del, bytes.Clone(k))
		last = getU64(k)
		n, _ := binary.Uvarint(v)
		lastN = uint32(n)
	}
	if len(del) == 0 {
		return Result{}, nil
	}
	for _, k := range del {
		if err := a.bk.log.Delete(k); err != nil {
			return Result{}, err
		}
	}
	if err := a.bk.meta.Put(keyLogCompacted, binary.BigEndian.AppendUint32(u64(last), lastN)); err != nil {
		return Result{}, err
	}
	res := Result{Applied: len(del)}
	if more {
		res.Next = strconv.FormatUint(last, 10)
	}
	return res, nil
}

// compactTombstones drops tombstones older than cutoff from up to limit
// device records from after on.
func (a *applier) compactTombstones(cutoff int64, after string, limit int) (Result, error) {
	stamp := hlc.New(cutoff, 0)
	var ids []string
	next := ""
	c := a.bk.devices.Cursor()
	for k, _ := c.Seek([]byte(after)); k != nil; k, _ = c.Next() {
		if len(ids) == limit {
			next = string(k)
			break
		}
		ids = append(ids, string(k))
	}
	n := 0
	for _, id := range ids {
		dev, err := a.device(id, 0)
		if err != nil {
			return Result{}, err
		}
		if p := dev.Reported.PurgeTombstones(stamp) + dev.Desired.PurgeTombstones(stamp); p > 0 {
			n += p
			a.changed(dev)
		}
	}
	return Result{Applied: n, Next: next}, nil
}

// logCompacted returns the last compacted log entry and its change count
// (0, 0 before any compaction).
func logCompacted(tx *bolt.Tx) (index uint64, n int) {
	v := tx.Bucket(bktMeta).Get(keyLogCompacted)
	if len(v) != 12 {
		return 0, 0
	}
	return binary.BigEndian.Uint64(v), int(binary.BigEndian.Uint32(v[8:]))
}

// checkExportCursor refuses a cursor (idx, sub as ParseExportCursor returns
// them) after which compacted changes would follow.
func checkExportCursor(tx *bolt.Tx, cursor string, idx uint64, sub int) error {
	last, n := logCompacted(tx)
	if last == 0 || idx > last || idx == last && sub >= n-1 {
		return nil
	}
	if cursor == "" || cursor == "0" {
		return nil // from the beginning: the oldest change kept
	}
	return &CompactedError{Cursor: cursor, Earliest: strconv.FormatUint(last, 10)}
}

// EarliestExportCursor is the earliest cursor whose changes are all still
// kept: "0" before any compaction.
func (f *FSM) EarliestExportCursor() string {
	var last uint64
	_ = f.view(func(tx *bolt.Tx) error { last, _ = logCompacted(tx); return nil })
	return strconv.FormatUint(last, 10)
}

// BucketStat is one bucket's size: its keys, and the bytes its pages use.
type BucketStat struct {
	Name  string
	Keys  int
	Bytes int
}

// BucketStats measures every top-level bucket, and Size is the state file's
// size as of the same read transaction (free pages included). It walks
// every page of the state: call it on a ticker, not per scrape.
func (f *FSM) BucketStats() (stats []BucketStat, size int64, err error) {
	err = f.view(func(tx *bolt.Tx) error {
		size = tx.Size()
		return tx.ForEach(func(name []byte, b *bolt.Bucket) error {
			s := b.Stats()
			stats = append(stats, BucketStat{Name: string(name), Keys: s.KeyN, Bytes: s.LeafInuse + s.BranchInuse + s.InlineBucketInuse})
			return nil
		})
	})
	return stats, size, err
}
