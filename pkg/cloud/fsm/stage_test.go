package fsm

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"path/filepath"
	"reflect"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/shadow"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// TestStagedMatchesDirect applies the same random pushes (small and large
// changes, with and without ids, resent batches, the same readings under new
// sequences) to a state that stages small changes and flushes every few
// readings, and to one that stages nothing. Every result and every page of
// every device's readings must be the same, across a reopen and a snapshot
// restore of the staging state while readings are staged; and both must
// agree with a plain model of the dedup rule.
func TestStagedMatchesDirect(t *testing.T) {
	dir := t.TempDir()
	discard := slog.New(slog.NewTextHandler(io.Discard, nil))
	openAt := func(name string, max, flushAt int) *FSM {
		t.Helper()
		f, err := Open(filepath.Join(dir, name), discard, Hooks{})
		if err != nil {
			t.Fatal(err)
		}
		f.stage.max, f.stage.flushAt = max, flushAt
		return f
	}
	staged, direct := openAt("staged.db", 4, 23), openAt("direct.db", 0, 1)
	defer func() { _ = staged.Close(); _ = direct.Close() }()

	rng := rand.New(rand.NewPCG(1, 2))
	edges := []string{"e0", "e1", "e2"}
	seqs := map[string]uint64{}
	// The model: a reading is new unless its (edge, device, id) — or, without
	// an id, its (edge, device, ts) — was stored before; a batch at or below
	// the edge's acknowledged sequence changes nothing.
	modelSeen, modelCount, modelAcked := map[string]bool{}, map[string]int{}, map[string]uint64{}
	var sawStaged, sawFlush, reopened, restored bool
	for index := uint64(1); index <= 400; index++ {
		var cmds []*Command
		for range 1 + rng.IntN(4) {
			edge := edges[rng.IntN(len(edges))]
			first := seqs[edge] + 1
			if rng.IntN(8) == 0 && seqs[edge] > 0 {
				first = seqs[edge] // resend the last batch's sequence
			}
			n := 1 + rng.IntN(3)
			if rng.IntN(5) == 0 {
				n = 5 + rng.IntN(20) // larger than the stage takes
			}
			p := &wire.PushBatch{Edge: edge, FirstSeq: first}
			dev := fmt.Sprintf("d%d", rng.IntN(4))
			ch := wire.Change{Kind: wire.KindReadings, Device: dev}
			for range n {
				r := wire.Reading{TS: int64(rng.IntN(300)), Metrics: map[string]float64{"v": float64(rng.IntN(9))}}
				if rng.IntN(2) == 0 {
					r.ID = fmt.Sprintf("m%d", rng.IntN(200))
				}
				ch.Readings = append(ch.Readings, r)
			}
			p.Changes = []wire.Change{ch}
			seqs[edge] = max(seqs[edge], first)
			cmds = append(cmds, &Command{Type: CmdPush, AtMs: int64(index), Push: p})
		}
		pre := staged.stage.n
		got, want := apply(t, staged, index, cmds...), apply(t, direct, index, cmds...)
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("entry %d: staged results %+v, direct %+v", index, got, want)
		}
		for i, c := range cmds {
			p := c.Push
			if p.FirstSeq <= modelAcked[p.Edge] {
				continue // resent: nothing applied
			}
			modelAcked[p.Edge] = p.FirstSeq
			dups := 0
			for _, r := range p.Changes[0].Readings {
				k := fmt.Sprintf("%s|%s|ts=%d|id=%s", p.Edge, p.Changes[0].Device, r.TS, r.ID)
				if modelSeen[k] {
					dups++
					continue
				}
				modelSeen[k] = true
				modelCount[p.Changes[0].Device]++
			}
			if got[i].Duplicates != dups || got[i].Applied != 1 {
				t.Fatalf("entry %d command %d: %+v, the model says %d duplicates", index, i, got[i], dups)
			}
		}
		before := staged.stage.n
		sawStaged = sawStaged || before > 0
		sawFlush = sawFlush || before < pre
		switch {
		case index >= 150 && !reopened && before > 0:
			reopened = true
			if err := staged.Close(); err != nil {
				t.Fatal(err)
			}
			staged = openAt("staged.db", 4, 23)
			if staged.stage.n != before {
				t.Fatalf("reopen: %d staged readings indexed, want %d", staged.stage.n, before)
			}
		case index >= 300 && !restored && before > 0:
			restored = true
			restoreBytes(t, staged, snapshotBytes(t, staged))
			if staged.stage.n != before {
				t.Fatalf("restore: %d staged readings indexed, want %d", staged.stage.n, before)
			}
		}
	}
	if !sawStaged || !sawFlush || !reopened || !restored {
		t.Fatalf("staged=%v flushed=%v reopened=%v restored=%v: the run must exercise all", sawStaged, sawFlush, reopened, restored)
	}
	if staged.stage.n == 0 {
		t.Fatal("nothing staged at the end: the final reads would not merge both places")
	}
	for d := range 4 {
		dev := fmt.Sprintf("d%d", d)
		if n := len(allPages(t, direct, ReadingsQuery{Device: dev, Limit: 1000})); n != modelCount[dev] {
			t.Fatalf("%s: %d readings stored, the model says %d", dev, n, modelCount[dev])
		}
		for _, q := range []ReadingsQuery{
			{Device: dev, Limit: 7},
			{Device: dev, Limit: 5, FromMs: 50, ToMs: 250},
			{Device: dev, Limit: 1000, Metric: "v"},
		} {
			if got, want := allPages(t, staged, q), allPages(t, direct, q); !reflect.DeepEqual(got, want) {
				t.Fatalf("%+v: staged %d readings, direct %d\nstaged %v\ndirect %v", q, len(got), len(want), got, want)
			}
		}
	}
}

// snapshotBytes streams f's state as raft would send it to a follower.
func snapshotBytes(t *testing.T, f *FSM) []byte {
	t.Helper()
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	sink := &memSink{}
	if err := snap.Persist(sink); err != nil {
		t.Fatal(err)
	}
	return sink.Bytes()
}

func restoreBytes(t *testing.T, f *FSM, snap []byte) {
	t.Helper()
	if err := f.Restore(io.NopCloser(bytes.NewReader(snap))); err != nil {
		t.Fatal(err)
	}
}

func allPages(t *testing.T, f *FSM, q ReadingsQuery) []StoredReading {
	t.Helper()
	var out []StoredReading
	for {
		items, next, err := f.Readings(q)
		if err != nil {
			t.Fatal(err)
		}
		if len(items) > q.Limit {
			t.Fatalf("page of %d over limit %d", len(items), q.Limit)
		}
		out = append(out, items...)
		if next == "" {
			return out
		}
		q.Cursor = next
	}
}

// TestStageFlushMovesEverything checks the flush itself: staged readings land
// under their devices (and nothing in reading_id), and the stage is left
// empty.
func TestStageFlushMovesEverything(t *testing.T) {
	f := open(t)
	f.stage.flushAt = 3
	apply(t, f, 1, push("e1", 1, rd(1, "a")), push("e2", 1, rd(2, "")))
	count := func(b []byte) (n int) {
		_ = f.view(func(tx *bolt.Tx) error { n = tx.Bucket(b).Stats().KeyN; return nil })
		return n
	}
	if count(bktRecent) != 2 || count(bktReadings) != 0 || f.stage.n != 2 {
		t.Fatalf("before flush: recent=%d readings=%d staged=%d", count(bktRecent), count(bktReadings), f.stage.n)
	}
	apply(t, f, 2, push("e1", 2, rd(3, "")))
	if count(bktRecent) != 0 || count(bktReadings) != 3 || count(bktReadID) != 0 || f.stage.n != 0 {
		t.Fatalf("after flush: recent=%d readings=%d ids=%d staged=%d", count(bktRecent), count(bktReadings), count(bktReadID), f.stage.n)
	}
	// Dedup still holds once flushed.
	if res := apply(t, f, 3, push("e1", 3, rd(1, "a"), rd(3, ""), rd(9, "a")))[0]; res.Duplicates != 2 || f.stage.n != 1 {
		t.Fatalf("id dedup after flush: %+v", res)
	}
}

// TestLastSeenWithoutRewritingTheRecord: a reading push moves last_seen
// forward through device_seen alone, and GetDevice reports it.
func TestLastSeenWithoutRewritingTheRecord(t *testing.T) {
	f := open(t)
	apply(t, f, 1, push("e1", 1, rd(5000, "")))
	record := func() []byte {
		var v []byte
		_ = f.view(func(tx *bolt.Tx) error { v = bytes.Clone(tx.Bucket(bktDevices).Get([]byte("d1"))); return nil })
		return v
	}
	before := record()
	apply(t, f, 2, push("e1", 2, rd(9000, "")))
	if !bytes.Equal(record(), before) {
		t.Fatalf("a reading push rewrote the device record:\n%s\n%s", before, record())
	}
	d, err := f.GetDevice("d1")
	if err != nil || d.LastSeen != 9000 || d.FirstSeen != 1000 || d.EdgeID != "e1" {
		t.Fatalf("device %+v %v", d, err)
	}
}

// TestRestoreDropsCachedDevices: after a restore, applies start from the
// restored device records, not from records cached before it.
func TestRestoreDropsCachedDevices(t *testing.T) {
	f := open(t)
	desired := func(v string) *Command {
		return &Command{Type: CmdDesired, AtMs: 1, Change: &wire.Change{Kind: wire.KindDesired, Device: "d1",
			Doc: shadow.Doc{"mode": {Value: []byte(v), Stamp: hlc.New(int64(len(v)), 0)}}}}
	}
	apply(t, f, 1, desired(`"a"`))
	snap := snapshotBytes(t, f)
	apply(t, f, 2, desired(`"later"`)) // cached, then undone by the restore
	restoreBytes(t, f, snap)
	apply(t, f, 2, push("e1", 1, rd(7, ""))) // rewrites the record (home edge)
	d, err := f.GetDevice("d1")
	if err != nil || string(d.Desired["mode"].Value) != `"a"` || d.EdgeID != "e1" {
		t.Fatalf("device after restore %+v %v", d, err)
	}
}

// TestNewestBoundIsNeverStale: a reading above its device's newest stored
// key skips the dedup lookup, so that bound must cover every reading stored
// anywhere: staged readings after a reopen, a restored snapshot's readings
// (the cached bound of the state it replaced is lower), and it may stay
// above readings retention deleted. Each case re-sends readings that are
// stored and must come back as duplicates.
func TestNewestBoundIsNeverStale(t *testing.T) {
	span := func(from, to int) []wire.Reading {
		var out []wire.Reading
		for i := from; i <= to; i++ {
			out = append(out, rd(int64(i), fmt.Sprint("r", i)))
		}
		return out
	}
	discard := slog.New(slog.NewTextHandler(io.Discard, nil))
	tests := []struct {
		name string
		// prepare applies entries up to index 9 and returns the state to
		// re-send to.
		prepare  func(t *testing.T) *FSM
		resend   []wire.Reading
		wantDups int
	}{
		{"staged readings after a reopen", func(t *testing.T) *FSM {
			path := filepath.Join(t.TempDir(), "state.db")
			f, err := Open(path, discard, Hooks{})
			if err != nil {
				t.Fatal(err)
			}
			apply(t, f, 1, pushDevice("e1", 1, "d1", span(1, 20)...))  // bulk
			apply(t, f, 2, pushDevice("e1", 2, "d1", span(21, 22)...)) // staged
			if f.stage.n != 2 {
				t.Fatalf("%d staged", f.stage.n)
			}
			if err := f.Close(); err != nil {
				t.Fatal(err)
			}
			if f, err = Open(path, discard, Hooks{}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = f.Close() })
			return f
		}, span(15, 22), 8},
		{"a restored snapshot's readings", func(t *testing.T) *FSM {
			src, dst := open(t), open(t)
			apply(t, src, 1, pushDevice("e1", 1, "d1", span(1, 20)...))
			apply(t, src, 2, pushDevice("e1", 2, "d1", span(21, 22)...))
			apply(t, dst, 1, pushDevice("e1", 1, "d1", span(1, 10)...)) // its bound: r10
			restoreBytes(t, dst, snapshotBytes(t, src))
			return dst
		}, span(1, 22), 22},
		{"retention deleted the older readings", func(t *testing.T) *FSM {
			f := open(t)
			apply(t, f, 1, pushDevice("e1", 1, "d1", span(1, 20)...))
			compactAll(t, f, 2, CompactCmd{What: CompactReadings, CutoffMs: 15})
			return f
		}, span(10, 22), 6}, // r15..r20 kept; r10..r14 and r21, r22 stored (anew)
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := tc.prepare(t)
			res := apply(t, f, 10, pushDevice("e1", f.EdgeSeq("e1")+1, "d1", tc.resend...))
			if len(res) != 1 || res[0].Err != nil || res[0].Duplicates != tc.wantDups {
				t.Fatalf("re-send: %+v, want %d duplicates", res, tc.wantDups)
			}
			got := allPages(t, f, ReadingsQuery{Device: "d1", Limit: 100})
			for i := 1; i < len(got); i++ {
				if got[i].TS == got[i-1].TS {
					t.Fatalf("reading %d stored twice", got[i].TS)
				}
			}
		})
	}
}
