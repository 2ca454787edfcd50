package fsm

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/shadow"
	"github.com/outpost-edge/outpost/pkg/wire"
)

func compactCmd(atMs int64, c CompactCmd) *Command {
	return &Command{Type: CmdCompact, AtMs: atMs, Compact: &c}
}

func pushDevice(edge string, seq uint64, device string, readings ...wire.Reading) *Command {
	return &Command{Type: CmdPush, AtMs: 1000, Push: &wire.PushBatch{Edge: edge, FirstSeq: seq,
		Changes: []wire.Change{{Kind: wire.KindReadings, Device: device, Readings: readings}}}}
}

// retentionLog is a log of pushes to three devices: big changes (inserted
// directly) and small ones (staged), readings with and without ids, at
// times 1..100.
func retentionLog() []*Command {
	var cmds []*Command
	seq := map[string]uint64{}
	for _, dev := range []string{"d1", "d2", "d3"} {
		var big []wire.Reading
		for ts := int64(1); ts <= 60; ts++ {
			id := ""
			if ts%2 == 0 {
				id = fmt.Sprintf("r%d", ts)
			}
			big = append(big, rd(ts, id))
		}
		seq["e1"]++
		cmds = append(cmds, pushDevice("e1", seq["e1"], dev, big...))
		for ts := int64(61); ts <= 100; ts += 2 {
			seq["e2"]++
			cmds = append(cmds, pushDevice("e2", seq["e2"], dev, rd(ts, ""), rd(ts+1, fmt.Sprintf("s%d", ts))))
		}
	}
	return cmds
}

// compactAll proposes chunks of one compaction from index on until the pass
// is done, and returns the next free index, the total applied and the
// number of chunks.
func compactAll(t *testing.T, f *FSM, index uint64, c CompactCmd) (next uint64, total, chunks int) {
	t.Helper()
	for {
		res := apply(t, f, index, compactCmd(5000, c))[0]
		index++
		chunks++
		if res.Err != nil {
			t.Fatal(res.Err)
		}
		// Limit counts deletions for readings and the log, devices for
		// tombstones (each may hold several).
		if c.What != CompactTombstones && c.Limit > 0 && res.Applied > c.Limit {
			t.Fatalf("chunk applied %d, over its limit %d", res.Applied, c.Limit)
		}
		total += res.Applied
		if res.Next == "" {
			return index, total, chunks
		}
		c.After = res.Next
		if chunks > 10000 {
			t.Fatal("compaction never finishes")
		}
	}
}

// stateDigest hashes every bucket's keys and values: equal digests, equal
// state.
func stateDigest(t *testing.T, f *FSM) [32]byte {
	t.Helper()
	h := sha256.New()
	err := f.view(func(tx *bolt.Tx) error {
		return tx.ForEach(func(name []byte, b *bolt.Bucket) error {
			fmt.Fprintf(h, "bucket %q\n", name)
			return b.ForEach(func(k, v []byte) error {
				_ = binary.Write(h, binary.BigEndian, uint32(len(k)))
				h.Write(k)
				_ = binary.Write(h, binary.BigEndian, uint32(len(v)))
				h.Write(v)
				return nil
			})
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	var out [32]byte
	copy(out[:], h.Sum(nil))
	return out
}

func bucketKeys(t *testing.T, f *FSM, bucket []byte) int {
	t.Helper()
	n := 0
	_ = f.view(func(tx *bolt.Tx) error { n = tx.Bucket(bucket).Stats().KeyN; return nil })
	return n
}

func TestCompactReadingsDeletesExactlyWhatIsOlder(t *testing.T) {
	for _, limit := range []int{0, 1, 7} {
		t.Run(fmt.Sprintf("limit %d", limit), func(t *testing.T) {
			f := open(t)
			idx := uint64(1)
			for _, c := range retentionLog() {
				apply(t, f, idx, c)
				idx++
			}
			if f.stage.n == 0 {
				t.Fatal("the log should leave readings staged")
			}
			const cutoff = 71
			_, deleted, chunks := compactAll(t, f, idx, CompactCmd{What: CompactReadings, CutoffMs: cutoff, Limit: limit})
			if deleted != 3*70 {
				t.Fatalf("deleted %d readings, want %d", deleted, 3*70)
			}
			if limit == 1 && chunks < deleted {
				t.Fatalf("limit 1 took %d chunks for %d deletions", chunks, deleted)
			}
			for _, dev := range []string{"d1", "d2", "d3"} {
				got := allPages(t, f, ReadingsQuery{Device: dev, Limit: 1000})
				if len(got) != 30 {
					t.Fatalf("%s keeps %d readings, want 30", dev, len(got))
				}
				for _, r := range got {
					if r.TS < cutoff {
						t.Fatalf("%s keeps a reading at %d, before the cutoff %d", dev, r.TS, cutoff)
					}
				}
				if _, err := f.GetDevice(dev); err != nil {
					t.Fatalf("device record %s went with its readings: %v", dev, err)
				}
			}
			// Nothing is written to reading_id (invariant 4); its old
			// entries go with their readings (TestOldLayoutState).
			if n := bucketKeys(t, f, bktReadID); n != 0 {
				t.Fatalf("reading_id holds %d entries", n)
			}
			if n := bucketKeys(t, f, bktRecent); n != 0 {
				t.Fatalf("stage holds %d readings after compaction", n)
			}
		})
	}
}

func TestCompactionIsDeterministic(t *testing.T) {
	a, b := open(t), open(t)
	for _, f := range []*FSM{a, b} {
		idx := uint64(1)
		for _, c := range retentionLog() {
			apply(t, f, idx, c)
			idx++
		}
		for _, dev := range []string{"d1", "d2", "d3"} {
			apply(t, f, idx, &Command{Type: CmdDesired, AtMs: 1000, Change: &wire.Change{Kind: wire.KindDesired, Device: dev,
				Doc: shadow.Doc{"gone": {Stamp: hlc.New(100, 0), Deleted: true}, "x": {Stamp: hlc.New(100, 1), Deleted: true},
					"v": {Value: json.RawMessage(`1`), Stamp: hlc.New(100, 2)}}}})
			idx++
		}
		idx, _, _ = compactAll(t, f, idx, CompactCmd{What: CompactReadings, CutoffMs: 50, Limit: 13})
		idx, _, _ = compactAll(t, f, idx, CompactCmd{What: CompactLog, CutoffMs: 0, Limit: 5})
		idx, _, _ = compactAll(t, f, idx, CompactCmd{What: CompactLog, CutoffMs: 5000, Limit: 5})
		compactAll(t, f, idx, CompactCmd{What: CompactTombstones, CutoffMs: 5000, Limit: 2})
	}
	if stateDigest(t, a) != stateDigest(t, b) {
		t.Fatal("two replicas applying the same log hold different state")
	}
	if bucketKeys(t, a, bktLog) != 0 {
		t.Fatal("log entries older than the cutoff, with no sinks, were kept")
	}
	if d, err := a.GetDevice("d2"); err != nil || len(d.Desired) != 1 {
		t.Fatalf("tombstones not purged: %+v %v", d, err)
	}
}

// setSinkCursor writes what the sinks' command would: sink → index taken.
func setSinkCursor(t *testing.T, f *FSM, sink string, index uint64) {
	t.Helper()
	err := f.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bktSinkCursor)
		if err != nil {
			return err
		}
		return b.Put([]byte(sink), u64(index))
	})
	if err != nil {
		t.Fatal(err)
	}
}

func logIndexes(t *testing.T, f *FSM) []uint64 {
	t.Helper()
	var out []uint64
	_ = f.view(func(tx *bolt.Tx) error {
		return tx.Bucket(bktLog).ForEach(func(k, _ []byte) error { out = append(out, getU64(k)); return nil })
	})
	return out
}

func TestCompactLogRespectsSinksAndRetention(t *testing.T) {
	f := open(t)
	// Entries 1..6 log one change each.
	for i := uint64(1); i <= 6; i++ {
		apply(t, f, i, push("e1", i, rd(int64(i), "")))
	}
	sinks := []string{"kafka", "nats"}
	steps := []struct {
		name     string
		index    uint64
		atMs     int64
		cutoffMs int64
		setup    func()
		want     []uint64 // log entries left
	}{
		// Index 7 leaves a mark at time 10_000: nothing is known to be older
		// than a cutoff of 5_000 yet.
		{"no mark old enough", 7, 10_000, 5_000, nil, []uint64{1, 2, 3, 4, 5, 6}},
		// The mark at 7 is now old enough, but no sink has taken anything.
		{"sinks took nothing", 8, 20_000, 10_000, nil, []uint64{1, 2, 3, 4, 5, 6}},
		{"one sink took 4, the other nothing", 9, 21_000, 10_000, func() { setSinkCursor(t, f, "kafka", 4) }, []uint64{1, 2, 3, 4, 5, 6}},
		{"both took some: the slower bounds", 10, 22_000, 10_000, func() { setSinkCursor(t, f, "nats", 2) }, []uint64{3, 4, 5, 6}},
		{"a sink past the time bound: time bounds", 11, 23_000, 10_000, func() { setSinkCursor(t, f, "nats", 100); setSinkCursor(t, f, "kafka", 100) }, nil},
	}
	for _, st := range steps {
		if st.setup != nil {
			st.setup()
		}
		res := apply(t, f, st.index, compactCmd(st.atMs, CompactCmd{What: CompactLog, CutoffMs: st.cutoffMs, Sinks: sinks}))[0]
		if res.Err != nil {
			t.Fatalf("%s: %v", st.name, res.Err)
		}
		if got := logIndexes(t, f); fmt.Sprint(got) != fmt.Sprint(st.want) {
			t.Fatalf("%s: log holds %v, want %v", st.name, got, st.want)
		}
	}
	// Without configured sinks a stale sink cursor constrains nothing, and
	// an unknown bucket is no constraint.
	g := open(t)
	for i := uint64(1); i <= 3; i++ {
		apply(t, g, i, push("e1", i, rd(int64(i), "")))
	}
	apply(t, g, 4, compactCmd(1000, CompactCmd{What: CompactLog, CutoffMs: 0}))
	apply(t, g, 5, compactCmd(2000, CompactCmd{What: CompactLog, CutoffMs: 1000}))
	if got := logIndexes(t, g); len(got) != 0 {
		t.Fatalf("no sinks: log holds %v, want nothing", got)
	}
}

func TestExportBeforeCompactedStartIsGone(t *testing.T) {
	f := open(t)
	for i := uint64(1); i <= 4; i++ {
		// Two changes per entry: devices d1 and d2.
		apply(t, f, i, &Command{Type: CmdPush, AtMs: 1000, Push: &wire.PushBatch{Edge: "e1", FirstSeq: 2*i - 1,
			Changes: []wire.Change{
				{Kind: wire.KindReadings, Device: "d1", Readings: []wire.Reading{rd(int64(i), "")}},
				{Kind: wire.KindReadings, Device: "d2", Readings: []wire.Reading{rd(int64(i), "")}},
			}}})
	}
	apply(t, f, 5, compactCmd(1000, CompactCmd{What: CompactLog}))
	setSinkCursor(t, f, "s", 2)
	apply(t, f, 6, compactCmd(2000, CompactCmd{What: CompactLog, CutoffMs: 1000, Sinks: []string{"s"}}))
	if got := logIndexes(t, f); fmt.Sprint(got) != "[3 4]" {
		t.Fatalf("log holds %v, want [3 4]", got)
	}
	if got := f.EarliestExportCursor(); got != "2" {
		t.Fatalf("earliest cursor %q, want 2", got)
	}
	for _, tc := range []struct {
		cursor string
		gone   bool
		first  string // first record's cursor when not gone
	}{
		{"", false, "3.0"},
		{"0", false, "3.0"},
		{"1", true, ""},
		{"1.1", true, ""},
		{"2.0", true, ""}, // 2.1 was compacted away after it
		{"2.1", false, "3.0"},
		{"2", false, "3.0"},
		{"3.0", false, "3.1"},
	} {
		var first string
		_, err := f.Export(tc.cursor, 10, func(r *ExportRecord) error {
			if first == "" {
				first = r.Cursor
			}
			return nil
		})
		var ce *CompactedError
		if tc.gone {
			if !errors.Is(err, ErrCompacted) || !errors.As(err, &ce) || ce.Earliest != "2" {
				t.Fatalf("cursor %q: err %v, want ErrCompacted with earliest 2", tc.cursor, err)
			}
			continue
		}
		if err != nil || first != tc.first {
			t.Fatalf("cursor %q: first %q err %v, want %q", tc.cursor, first, err, tc.first)
		}
	}
}

func TestCompactTombstones(t *testing.T) {
	f := open(t)
	doc := shadow.Doc{
		"old":  {Stamp: hlc.New(1000, 0), Deleted: true},
		"new":  {Stamp: hlc.New(9000, 0), Deleted: true},
		"kept": {Value: json.RawMessage(`1`), Stamp: hlc.New(500, 0)},
	}
	for i, dev := range []string{"a", "b", "c"} {
		apply(t, f, uint64(i+1), &Command{Type: CmdDesired, AtMs: 1000, Change: &wire.Change{Kind: wire.KindDesired, Device: dev, Doc: doc.Clone()}})
	}
	_, purged, chunks := compactAll(t, f, 4, CompactCmd{What: CompactTombstones, CutoffMs: 5000, Limit: 1})
	if purged != 3 || chunks != 3 {
		t.Fatalf("purged %d tombstones in %d chunks, want 3 in 3", purged, chunks)
	}
	for _, dev := range []string{"a", "b", "c"} {
		d, err := f.GetDevice(dev)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := d.Desired["old"]; ok {
			t.Fatalf("%s: tombstone older than the cutoff kept", dev)
		}
		if f, ok := d.Desired["new"]; !ok || !f.Deleted {
			t.Fatalf("%s: newer tombstone purged", dev)
		}
		if _, ok := d.Desired["kept"]; !ok {
			t.Fatalf("%s: a live field was purged", dev)
		}
	}
	// The purge is written, not only cached: a restart reads it back.
	re := reopen(t, f)
	if d, _ := re.GetDevice("a"); d == nil || len(d.Desired) != 2 {
		t.Fatalf("after reopen: %+v", d)
	}
}

func reopen(t *testing.T, f *FSM) *FSM {
	t.Helper()
	path := f.path
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	g, err := Open(path, f.log, Hooks{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = g.Close() })
	return g
}

func TestSnapshotShrinksWithState(t *testing.T) {
	f := open(t)
	idx := uint64(1)
	for b := 0; b < 20; b++ {
		var rs []wire.Reading
		for i := 0; i < 1000; i++ {
			ts := int64(b*1000 + i)
			rs = append(rs, wire.Reading{TS: ts, ID: fmt.Sprintf("id-%d", ts), Metrics: map[string]float64{"a": 1, "b": 2, "c": float64(ts)}})
		}
		apply(t, f, idx, pushDevice("e1", idx, fmt.Sprintf("dev-%d", b%4), rs...))
		idx++
	}
	before := len(snapshotBytes(t, f))
	idx, _, _ = compactAll(t, f, idx, CompactCmd{What: CompactReadings, CutoffMs: 19_000})
	apply(t, f, idx, compactCmd(1, CompactCmd{What: CompactLog}))
	compactAll(t, f, idx+1, CompactCmd{What: CompactLog, CutoffMs: 1})
	var fileSize int64
	_ = f.view(func(tx *bolt.Tx) error { fileSize = tx.Size(); return nil })
	snap := snapshotBytes(t, f)
	after := len(snap)
	t.Logf("snapshot %d bytes before, %d after deleting 95%% (state file %d bytes)", before, after, fileSize)
	if after*4 > before {
		t.Fatalf("snapshot %d bytes after deleting 95%% of the state, %d before: not proportional to what is kept", after, before)
	}
	if int64(after)*2 > fileSize {
		t.Fatalf("snapshot %d bytes, the file %d: free pages were copied", after, fileSize)
	}
	// The compacted copy restores to the same state.
	g := open(t)
	restoreBytes(t, g, snap)
	if stateDigest(t, g) != stateDigest(t, f) {
		t.Fatal("the restored compacted snapshot differs from the state it was taken of")
	}
	if got := allPages(t, g, ReadingsQuery{Device: "dev-3", Limit: 5000}); len(got) != 1000 {
		t.Fatalf("restored %d readings of dev-3, want 1000", len(got))
	}
}

func TestBucketStats(t *testing.T) {
	f := open(t)
	var rs []wire.Reading
	for i := int64(0); i < 100; i++ {
		rs = append(rs, rd(i, fmt.Sprint("r", i)))
	}
	apply(t, f, 1, push("e1", 1, rs...))
	stats, size, err := f.BucketStats()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]BucketStat{}
	for _, s := range stats {
		got[s.Name] = s
	}
	for name, keys := range map[string]int{"readings": 100, "reading_id": 0, "log": 1, "devices": 1, "edge_seq": 1} {
		if got[name].Keys != keys || got[name].Bytes <= 0 {
			t.Fatalf("%s: %+v, want %d keys and some bytes", name, got[name], keys)
		}
	}
	if got["readings"].Bytes < 100*10 || size < int64(got["readings"].Bytes) {
		t.Fatalf("readings %d bytes in a %d-byte file", got["readings"].Bytes, size)
	}
}
