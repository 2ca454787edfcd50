package fsm

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/outpost-edge/outpost/pkg/wire"
)

// testdata/oldlayout/state.bbolt (a state file; *.db is ignored) was
// written by the last version that wrote reading_id entries (commit e50b34d),
// applying oldLayoutLog with a stage that flushes at 6 readings, and copied
// as a snapshot copies: reading_id holds the ids of its bulk and flushed
// staged readings, and one id'd reading is still staged. answers.json holds
// what that version answered (answersOf) from the same state.

// oldLayoutLog is the log the fixture applied, one entry per element.
func oldLayoutLog() [][]*Command {
	ids := func(dev string, from, to int) wire.Change {
		ch := wire.Change{Kind: wire.KindReadings, Device: dev}
		for i := from; i <= to; i++ {
			ch.Readings = append(ch.Readings, rd(int64(i), fmt.Sprintf("m%d", i)))
		}
		return ch
	}
	plain := func(dev string, from, to int) wire.Change {
		ch := wire.Change{Kind: wire.KindReadings, Device: dev}
		for i := from; i <= to; i++ {
			ch.Readings = append(ch.Readings, rd(int64(i), ""))
		}
		return ch
	}
	pushOf := func(edge string, seq uint64, chs ...wire.Change) *Command {
		return &Command{Type: CmdPush, AtMs: 1000, Push: &wire.PushBatch{Edge: edge, FirstSeq: seq, Changes: chs}}
	}
	small := func(dev string, rs ...wire.Reading) wire.Change {
		return wire.Change{Kind: wire.KindReadings, Device: dev, Readings: rs}
	}
	return [][]*Command{
		{pushOf("e1", 1, ids("d1", 1, 20), plain("d2", 101, 110))},
		{pushOf("e1", 3, small("d3", rd(201, "s1"), rd(202, "s2"))), pushOf("e2", 1, small("d1", rd(5, "m5")))},
		{pushOf("e1", 4, small("d3", rd(203, "s3"), rd(204, ""))), pushOf("e2", 2, small("d1", rd(6, "")))},
		{pushOf("e1", 5, small("d3", rd(205, "s4")))},
	}
}

// oldLayoutAnswers is what a state answers about its readings: every page
// of each device's readings, and the export log.
type oldLayoutAnswers struct {
	Readings map[string][]StoredReading `json:"readings"`
	Export   []ExportRecord             `json:"export"`
}

func answersOf(t *testing.T, f *FSM) oldLayoutAnswers {
	t.Helper()
	a := oldLayoutAnswers{Readings: map[string][]StoredReading{}}
	for _, dev := range []string{"d1", "d2", "d3"} {
		a.Readings[dev] = allPages(t, f, ReadingsQuery{Device: dev, Limit: 7})
	}
	if _, err := f.Export("", 1000, func(r *ExportRecord) error { a.Export = append(a.Export, *r); return nil }); err != nil {
		t.Fatal(err)
	}
	return a
}

// openOldLayout opens a copy of the fixture.
func openOldLayout(t *testing.T) *FSM {
	t.Helper()
	src, err := os.ReadFile(filepath.Join("testdata", "oldlayout", "state.bbolt"))
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "state.db")
	if err := os.WriteFile(path, src, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := Open(path, slog.New(slog.NewTextHandler(io.Discard, nil)), Hooks{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })
	return f
}

// TestOldLayoutState: a state file with reading_id entries (the layout
// before readings were identified by their key alone) opens and answers
// exactly as the version that wrote it did; re-sent copies of its readings,
// stored, flushed from the stage or still staged, are duplicates; and
// retention deletes its reading_id entries with their readings.
func TestOldLayoutState(t *testing.T) {
	f := openOldLayout(t)
	if n, staged := bucketKeys(t, f, bktReadID), f.stage.n; n != 24 || staged != 1 {
		t.Fatalf("fixture: reading_id holds %d entries (want 24), %d staged (want 1)", n, staged)
	}
	raw, err := os.ReadFile(filepath.Join("testdata", "oldlayout", "answers.json"))
	if err != nil {
		t.Fatal(err)
	}
	var want oldLayoutAnswers
	if err := json.Unmarshal(raw, &want); err != nil {
		t.Fatal(err)
	}
	// Through JSON, as the fixture's answers were written.
	gotJSON, _ := json.Marshal(answersOf(t, f))
	var got oldLayoutAnswers
	if err := json.Unmarshal(gotJSON, &got); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("the old state answers\n%s\nthe version that wrote it answered\n%s", gotJSON, raw)
	}

	// Every reading again, under new sequences: bulk (d1, d2), staged and
	// flushed (d3's s1, e2's m5) and still staged (s4).
	log := oldLayoutLog()
	again := &Command{Type: CmdPush, AtMs: 2000, Push: &wire.PushBatch{Edge: "e1", FirstSeq: 6, Changes: []wire.Change{
		log[0][0].Push.Changes[0], log[0][0].Push.Changes[1],
		{Kind: wire.KindReadings, Device: "d3", Readings: []wire.Reading{rd(201, "s1"), rd(205, "s4"), rd(204, "")}},
	}}}
	e2 := &Command{Type: CmdPush, AtMs: 2000, Push: &wire.PushBatch{Edge: "e2", FirstSeq: 3, Changes: []wire.Change{
		{Kind: wire.KindReadings, Device: "d1", Readings: []wire.Reading{rd(5, "m5"), rd(6, "")}},
	}}}
	res := apply(t, f, f.AppliedIndex()+1, again, e2)
	if len(res) != 2 || res[0].Err != nil || res[0].Duplicates != 33 || res[1].Err != nil || res[1].Duplicates != 2 {
		t.Fatalf("re-sent readings: %+v, want 33 and 2 duplicates", res)
	}
	after := answersOf(t, f)
	if len(after.Export) != len(want.Export) {
		t.Fatalf("duplicates were exported: %d export records, want %d", len(after.Export), len(want.Export))
	}
	gotR, _ := json.Marshal(after.Readings)
	wantR, _ := json.Marshal(want.Readings)
	if string(gotR) != string(wantR) {
		t.Fatalf("readings after the duplicates\n%s\nwant\n%s", gotR, wantR)
	}

	// Retention past every reading takes the old ids with them.
	_, deleted, _ := compactAll(t, f, f.AppliedIndex()+1, CompactCmd{What: CompactReadings, CutoffMs: 1000})
	if deleted != 37 || bucketKeys(t, f, bktReadings) != 0 || bucketKeys(t, f, bktReadID) != 0 {
		t.Fatalf("retention deleted %d readings (want 37); left %d readings, %d reading_id entries",
			deleted, bucketKeys(t, f, bktReadings), bucketKeys(t, f, bktReadID))
	}
}
