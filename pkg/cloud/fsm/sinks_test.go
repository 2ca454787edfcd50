package fsm

import (
	"encoding/binary"
	"errors"
	"testing"

	bolt "go.etcd.io/bbolt"
)

func sinkAt(name string, index uint64) *Command {
	return &Command{Type: CmdSinkCursor, AtMs: 1, Sink: &SinkCursorCmd{Sink: name, Index: index}}
}

// TestSinkCursorOnlyMovesForward: a sink's cursor is created by its first
// command (0 registers it), moves forward, never back (a deposed leader's
// late proposal), and is stored as the 8-byte big-endian index retention
// reads.
func TestSinkCursorOnlyMovesForward(t *testing.T) {
	f := open(t)
	for i, tc := range []struct {
		cmd     *Command
		applied int
		want    uint64
		err     error
	}{
		{sinkAt("js", 0), 1, 0, nil},
		{sinkAt("js", 7), 1, 7, nil},
		{sinkAt("js", 7), 0, 7, nil},
		{sinkAt("js", 3), 0, 7, nil},
		{sinkAt("js", 12), 1, 12, nil},
		{&Command{Type: CmdSinkCursor, Sink: &SinkCursorCmd{Index: 9}}, 0, 12, ErrCorrupt},
	} {
		res := apply(t, f, uint64(i+1), tc.cmd)[0]
		if res.Applied != tc.applied || !errors.Is(res.Err, tc.err) {
			t.Fatalf("step %d: %+v", i, res)
		}
		got, ok, err := f.SinkCursor("js")
		if err != nil || !ok || got != tc.want {
			t.Fatalf("step %d: cursor %d %v %v, want %d", i, got, ok, err, tc.want)
		}
	}
	apply(t, f, 10, sinkAt("kafka", 4))
	all, err := f.SinkCursors()
	if err != nil || len(all) != 2 || all["js"] != 12 || all["kafka"] != 4 {
		t.Fatalf("cursors %v %v", all, err)
	}
	if _, ok, _ := f.SinkCursor("nope"); ok {
		t.Fatal("an unknown sink has a cursor")
	}
	rm := &Command{Type: CmdSinkCursor, Sink: &SinkCursorCmd{Sink: "kafka", Remove: true}}
	if res := apply(t, f, 11, rm)[0]; res.Applied != 1 {
		t.Fatalf("remove: %+v", res)
	}
	if res := apply(t, f, 12, rm)[0]; res.Applied != 0 || res.Err != nil {
		t.Fatalf("remove again: %+v", res)
	}
	if all, _ := f.SinkCursors(); len(all) != 1 || all["js"] != 12 {
		t.Fatalf("after remove: %v", all)
	}
	err = f.view(func(tx *bolt.Tx) error {
		v := tx.Bucket([]byte("sink_cursor")).Get([]byte("js"))
		if len(v) != 8 || binary.BigEndian.Uint64(v) != 12 {
			t.Fatalf("stored %x, want 8-byte big-endian 12", v)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestExportBehind counts the export entries and records after an index,
// bounded by maxEntries.
func TestExportBehind(t *testing.T) {
	f := open(t)
	apply(t, f, 1, push("e1", 1, rd(1, ""), rd(2, "")))                // one record (one change)
	apply(t, f, 2, sinkAt("js", 0))                                    // no record
	apply(t, f, 3, push("e1", 2, rd(3, "")), push("e1", 3, rd(4, ""))) // two records
	for _, tc := range []struct {
		after            uint64
		max              int
		entries, records int
		complete         bool
	}{
		{0, 100, 2, 3, true},
		{1, 100, 1, 2, true},
		{2, 100, 1, 2, true},
		{3, 100, 0, 0, true},
		{0, 1, 1, 1, false},
	} {
		e, r, c, err := f.ExportBehind(tc.after, tc.max)
		if err != nil || e != tc.entries || r != tc.records || c != tc.complete {
			t.Fatalf("after %d max %d: %d entries %d records complete %v (%v), want %+v", tc.after, tc.max, e, r, c, err, tc)
		}
	}
	var n int
	if _, err := f.Export("3", 100, func(*ExportRecord) error { n++; return nil }); err != nil || n != 0 {
		t.Fatalf("export after the last entry: %d records, %v", n, err)
	}
}
