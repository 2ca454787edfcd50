package fsm

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"testing"

	"github.com/hashicorp/raft"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/shadow"
	"github.com/outpost-edge/outpost/pkg/wire"
)

func open(t *testing.T) *FSM {
	t.Helper()
	f, err := Open(filepath.Join(t.TempDir(), "state.db"), slog.New(slog.NewTextHandler(io.Discard, nil)), Hooks{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })
	return f
}

// apply proposes cmds as one entry at index and returns their results.
func apply(t *testing.T, f *FSM, index uint64, cmds ...*Command) []Result {
	t.Helper()
	var enc [][]byte
	for _, c := range cmds {
		b, err := EncodeCommand(c)
		if err != nil {
			t.Fatal(err)
		}
		enc = append(enc, b)
	}
	out := f.Apply(&raft.Log{Index: index, Type: raft.LogCommand, Data: EncodeEntry(enc)})
	res, _ := out.([]Result)
	return res
}

func push(edge string, seq uint64, readings ...wire.Reading) *Command {
	return &Command{Type: CmdPush, AtMs: 1000, Push: &wire.PushBatch{Edge: edge, FirstSeq: seq,
		Changes: []wire.Change{{Kind: wire.KindReadings, Device: "d1", Readings: readings}}}}
}

func rd(ts int64, id string) wire.Reading {
	return wire.Reading{TS: ts, ID: id, Metrics: map[string]float64{"t": float64(ts)}}
}

func TestPushSequencesAndDedup(t *testing.T) {
	f := open(t)
	tests := []struct {
		name              string
		cmd               *Command
		wantErr           error
		wantAcked         uint64
		wantApplied, dups int
	}{
		{"first batch", push("e1", 1, rd(1, ""), rd(2, "a")), nil, 1, 1, 0},
		{"resend is a no-op", push("e1", 1, rd(1, ""), rd(2, "a")), nil, 1, 0, 0},
		{"gap refused", push("e1", 5, rd(9, "")), ErrSeqGap, 1, 0, 0},
		{"same readings under a new seq are deduplicated", push("e1", 2, rd(1, ""), rd(2, "a")), nil, 2, 1, 2},
		// The key (edge, device, ts, id) identifies a reading: an id at
		// another time is another reading, as the edge stores it.
		{"an id at another ts is another reading", push("e1", 3, rd(3, "a"), rd(2, "a")), nil, 3, 1, 1},
		{"other edge has its own sequence", push("e2", 1, rd(1, "")), nil, 1, 1, 0},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res := apply(t, f, uint64(i+1), tc.cmd)[0]
			if !errors.Is(res.Err, tc.wantErr) || res.AckedSeq != tc.wantAcked || res.Applied != tc.wantApplied || res.Duplicates != tc.dups {
				t.Fatalf("got %+v", res)
			}
		})
	}
	items, _, err := f.Readings(ReadingsQuery{Device: "d1", Limit: 100})
	if err != nil || len(items) != 4 { // ts1 from e1, ts2 and ts3 id a from e1, ts1 from e2
		t.Fatalf("readings %+v %v", items, err)
	}
	// A replayed entry (index already applied) changes nothing.
	if res := apply(t, f, 2, push("e1", 3, rd(50, ""))); res != nil {
		t.Fatalf("replayed entry applied: %+v", res)
	}
	if f.EdgeSeq("e1") != 3 {
		t.Fatalf("e1 seq %d", f.EdgeSeq("e1"))
	}
}

func TestShadowMergeAndDownlink(t *testing.T) {
	f := open(t)
	st := func(ms int64) hlc.Timestamp { return hlc.New(ms, 0) }
	// Pre-provisioned desired state, then the device appears at e1.
	apply(t, f, 1, &Command{Type: CmdDesired, AtMs: 1, Change: &wire.Change{Kind: wire.KindDesired, Device: "d1",
		Doc: shadow.Doc{"mode": {Value: []byte(`"eco"`), Stamp: st(10)}}}})
	apply(t, f, 2, push("e1", 1, rd(1, "")))
	page, err := f.Pull("e1", "", 10)
	if err != nil || len(page.Changes) != 1 || page.Changes[0].Kind != wire.KindDesired {
		t.Fatalf("pre-provisioned desired not routed to the home edge: %+v %v", page, err)
	}
	// An older edge write loses; a newer one wins; a delete tombstones.
	older := &Command{Type: CmdPush, AtMs: 2, Push: &wire.PushBatch{Edge: "e1", FirstSeq: 2, Changes: []wire.Change{
		{Kind: wire.KindDesired, Device: "d1", Doc: shadow.Doc{"mode": {Value: []byte(`"old"`), Stamp: st(5)}}},
		{Kind: wire.KindReported, Device: "d1", Doc: shadow.Doc{"fw": {Value: []byte(`"1"`), Stamp: st(20)}}},
		{Kind: wire.KindReported, Device: "d1", Doc: shadow.Doc{"fw": {Deleted: true, Stamp: st(30)}}},
	}}}
	apply(t, f, 3, older)
	d, err := f.GetDevice("d1")
	if err != nil {
		t.Fatal(err)
	}
	if string(d.Desired["mode"].Value) != `"eco"` || !d.Reported["fw"].Deleted || d.EdgeID != "e1" {
		t.Fatalf("device %+v", d)
	}
	if f.MaxStamp() != st(30) {
		t.Fatalf("max stamp %v", f.MaxStamp())
	}
	next, _ := f.Pull("e1", page.NextCursor, 10)
	if len(next.Changes) != 0 {
		t.Fatalf("edge's own writes echoed back: %+v", next.Changes)
	}
}

func TestSnapshotRestore(t *testing.T) {
	src := open(t)
	apply(t, src, 1, push("e1", 1, rd(1, ""), rd(2, "")))
	snap, err := src.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	apply(t, src, 2, push("e1", 2, rd(3, ""))) // after the snapshot point
	sink := &memSink{}
	if err := snap.Persist(sink); err != nil {
		t.Fatal(err)
	}
	dst := open(t)
	apply(t, dst, 1, push("e9", 1, rd(7, "")))
	if err := dst.Restore(io.NopCloser(bytes.NewReader(sink.Bytes()))); err != nil {
		t.Fatal(err)
	}
	if dst.AppliedIndex() != 1 || dst.EdgeSeq("e1") != 1 || dst.EdgeSeq("e9") != 0 {
		t.Fatalf("restored applied=%d e1=%d e9=%d", dst.AppliedIndex(), dst.EdgeSeq("e1"), dst.EdgeSeq("e9"))
	}
	items, _, _ := dst.Readings(ReadingsQuery{Device: "d1", Limit: 10})
	if len(items) != 2 {
		t.Fatalf("restored %d readings, want 2 (the snapshot is consistent as of index 1)", len(items))
	}
	var lines int
	next, err := dst.Export("", 100, func(*ExportRecord) error { lines++; return nil })
	if err != nil || lines != 1 || next != "1.0" {
		t.Fatalf("export %d %q %v", lines, next, err)
	}
}

func TestReadingsCursorPages(t *testing.T) {
	f := open(t)
	var rs []wire.Reading
	for i := int64(1); i <= 25; i++ {
		rs = append(rs, rd(i, ""))
	}
	apply(t, f, 1, push("e1", 1, rs...))
	var got []int64
	cursor := ""
	for {
		items, next, err := f.Readings(ReadingsQuery{Device: "d1", Limit: 10, Cursor: cursor, FromMs: 3, ToMs: 24})
		if err != nil {
			t.Fatal(err)
		}
		for _, it := range items {
			got = append(got, it.TS)
		}
		if next == "" {
			break
		}
		cursor = next
	}
	if len(got) != 21 || got[0] != 3 || got[20] != 23 {
		t.Fatalf("paged %v", got)
	}
	if _, _, err := f.Readings(ReadingsQuery{Device: "d2", Limit: 1, Cursor: cursor}); !errors.Is(err, ErrBadCursor) {
		t.Fatalf("foreign cursor: %v", err)
	}
}

type memSink struct{ bytes.Buffer }

func (m *memSink) ID() string    { return "mem" }
func (m *memSink) Cancel() error { return nil }
func (m *memSink) Close() error  { return nil }

// TestBulkReadingsDedupAcrossChanges: a transaction's large changes are put
// at its end in key order (bulkPuts), so duplicates between changes of one
// transaction, and between its large and staged changes, are found before
// anything is in the bucket.
func TestBulkReadingsDedupAcrossChanges(t *testing.T) {
	for _, bulkMax := range []int{defaultBulkFlushAt, 4} { // 4: put in runs within the transaction
		t.Run(fmt.Sprintf("queue of %d", bulkMax), func(t *testing.T) { testBulkDedup(t, bulkMax) })
	}
}

func testBulkDedup(t *testing.T, bulkMax int) {
	f := open(t)
	f.bulkMax = bulkMax
	ids := func(from, to int) []wire.Reading {
		var out []wire.Reading
		for i := from; i < to; i++ {
			out = append(out, rd(int64(i), fmt.Sprintf("x%d", i)))
		}
		return out
	}
	plain := func(from, to int) []wire.Reading {
		var out []wire.Reading
		for i := from; i < to; i++ {
			out = append(out, rd(int64(i), ""))
		}
		return out
	}
	ch := func(rs []wire.Reading) wire.Change {
		return wire.Change{Kind: wire.KindReadings, Device: "d1", Readings: rs}
	}
	p := &Command{Type: CmdPush, AtMs: 1000, Push: &wire.PushBatch{Edge: "e1", FirstSeq: 1, Changes: []wire.Change{
		ch(ids(0, 10)), ch(ids(5, 15)), // five ids again
		ch(plain(100, 110)), ch(plain(105, 115)), // five timestamps again
		ch([]wire.Reading{rd(14, "x14"), rd(114, "")}), // staged (small): both again
	}}}
	res := apply(t, f, 1, p)
	if len(res) != 1 || res[0].Err != nil || res[0].Duplicates != 12 {
		t.Fatalf("first entry: %+v, want 12 duplicates", res)
	}
	// The next entry repeats all of it: every reading is now stored.
	p2 := &Command{Type: CmdPush, AtMs: 1000, Push: &wire.PushBatch{Edge: "e1", FirstSeq: 6, Changes: []wire.Change{
		ch(append(ids(0, 15), plain(100, 115)...)),
	}}}
	if res := apply(t, f, 2, p2); len(res) != 1 || res[0].Err != nil || res[0].Duplicates != 30 {
		t.Fatalf("second entry: %+v, want 30 duplicates", res)
	}
	items, _, err := f.Readings(ReadingsQuery{Device: "d1", Limit: 100})
	if err != nil || len(items) != 30 {
		t.Fatalf("stored %d readings, want 30 (%v)", len(items), err)
	}
	for i := 1; i < len(items); i++ {
		if items[i].TS < items[i-1].TS {
			t.Fatalf("readings out of order at %d: %+v", i, items)
		}
	}
}
