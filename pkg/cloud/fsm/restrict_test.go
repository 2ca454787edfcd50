package fsm

import (
	"errors"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/outpost-edge/outpost/pkg/wire"
)

// signed is a push of readings changes with their digests, as the leader
// proposes it.
func signed(edge string, first uint64, tss ...int64) *Command {
	p := &wire.PushBatch{Edge: edge, FirstSeq: first}
	var sums []wire.Digest
	for _, ts := range tss {
		p.Changes = append(p.Changes, wire.Change{Kind: wire.KindReadings, Device: "d1", Readings: []wire.Reading{rd(ts, "")}})
		sums = append(sums, p.Changes[len(p.Changes)-1].Digest())
	}
	return &Command{Type: CmdPush, AtMs: 1000, Push: p, Digests: sums}
}

func storedSeq(t *testing.T, f *FSM, edge string) (seq, digest []byte) {
	t.Helper()
	_ = f.db.View(func(tx *bolt.Tx) error {
		seq = append([]byte(nil), tx.Bucket(bktSeq).Get([]byte(edge))...)
		digest = append([]byte(nil), tx.Bucket(bktDigest).Get([]byte(edge))...)
		return nil
	})
	return seq, digest
}

// TestSeqChainInRecord: the digest chain lives in the edge's sequence
// record (one Put per push), re-sends are checked against it, and the
// window keeps the last digestWindow push ends.
func TestSeqChainInRecord(t *testing.T) {
	f := open(t)
	index := uint64(0)
	step := func(c *Command) Result {
		index++
		return apply(t, f, index, c)[0]
	}
	if r := step(signed("e1", 1, 1, 2, 3)); r.Err != nil || r.AckedSeq != 3 {
		t.Fatalf("push 1..3: %+v", r)
	}
	if r := step(signed("e1", 4, 4, 5)); r.Err != nil || r.AckedSeq != 5 {
		t.Fatalf("push 4..5: %+v", r)
	}
	seq, digest := storedSeq(t, f, "e1")
	if len(seq) != 8+2*chainEntry || len(digest) != 0 || getU64(seq) != 5 {
		t.Fatalf("edge_seq value %d bytes (seq %d), edge_digest %d bytes; want the sequence and two chain entries in edge_seq", len(seq), getU64(seq), len(digest))
	}
	if f.EdgeSeq("e1") != 5 {
		t.Fatalf("EdgeSeq = %d", f.EdgeSeq("e1"))
	}
	tests := []struct {
		name string
		cmd  *Command
		want error
	}{
		{"same first push again", signed("e1", 1, 1, 2, 3), nil},
		{"same both pushes again", signed("e1", 1, 1, 2, 3, 4, 5), nil},
		{"same second push and a new change", signed("e1", 4, 4, 5, 6), nil},
		{"other content under applied sequences", signed("e1", 1, 1, 2, 99), ErrSeqConflict},
		{"a re-send starting inside a push", signed("e1", 2, 2, 3), ErrSeqConflict},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if r := step(tc.cmd); !errors.Is(r.Err, tc.want) {
				t.Fatalf("err = %v, want %v", r.Err, tc.want)
			}
		})
	}
	// The service's check of a re-send, without proposing, reads the same.
	if err := f.CheckResend("e1", 1, signed("e1", 1, 1, 2, 3).Digests); err != nil {
		t.Fatalf("CheckResend of the same changes: %v", err)
	}
	if err := f.CheckResend("e1", 1, signed("e1", 1, 1, 2, 99).Digests); !errors.Is(err, ErrSeqConflict) {
		t.Fatalf("CheckResend of other content: %v, want ErrSeqConflict", err)
	}
	for i := range 2 * digestWindow {
		if r := step(signed("e1", uint64(7+i), int64(100+i))); r.Err != nil {
			t.Fatalf("push %d: %+v", 7+i, r)
		}
	}
	if seq, _ := storedSeq(t, f, "e1"); len(seq) != 8+digestWindow*chainEntry {
		t.Fatalf("edge_seq value %d bytes after %d pushes, want the window of %d", len(seq), 2*digestWindow, digestWindow)
	}
}

// TestSeqChainOldLayout: state written before the chain moved into
// edge_seq (the sequence alone, the chain in edge_digest, or no chain at
// all) is still checked, and the next push moves the chain.
func TestSeqChainOldLayout(t *testing.T) {
	f := open(t)
	apply(t, f, 1, signed("e1", 1, 1, 2))
	apply(t, f, 2, signed("e2", 1, 1))
	// Rewrite both edges to the old layouts: e1 with its chain in
	// edge_digest, e2 from before digests (no chain anywhere).
	err := f.db.Update(func(tx *bolt.Tx) error {
		seq, dig := tx.Bucket(bktSeq), tx.Bucket(bktDigest)
		v := append([]byte(nil), seq.Get([]byte("e1"))...)
		if err := seq.Put([]byte("e1"), v[:8]); err != nil {
			return err
		}
		if err := dig.Put([]byte("e1"), v[8:]); err != nil {
			return err
		}
		v2 := append([]byte(nil), seq.Get([]byte("e2"))...)
		return seq.Put([]byte("e2"), v2[:8])
	})
	if err != nil {
		t.Fatal(err)
	}
	if f.EdgeSeq("e1") != 2 || f.EdgeSeq("e2") != 1 {
		t.Fatalf("EdgeSeq e1 %d e2 %d", f.EdgeSeq("e1"), f.EdgeSeq("e2"))
	}
	if r := apply(t, f, 3, signed("e1", 1, 1, 7)); !errors.Is(r[0].Err, ErrSeqConflict) {
		t.Fatalf("squatted re-send against the old layout: %+v", r[0])
	}
	if r := apply(t, f, 4, signed("e1", 1, 1, 2)); r[0].Err != nil || r[0].AckedSeq != 2 {
		t.Fatalf("re-send against the old layout: %+v", r[0])
	}
	if r := apply(t, f, 5, signed("e2", 1, 42)); r[0].Err != nil {
		t.Fatalf("an edge without a chain has nothing to compare with: %+v", r[0])
	}
	// The next push moves e1's chain into its record.
	if r := apply(t, f, 6, signed("e1", 3, 3)); r[0].Err != nil || r[0].AckedSeq != 3 {
		t.Fatalf("push 3: %+v", r[0])
	}
	seq, digest := storedSeq(t, f, "e1")
	if len(seq) != 8+2*chainEntry || len(digest) != 0 {
		t.Fatalf("after a push: edge_seq %d bytes, edge_digest %d bytes; want the chain moved", len(seq), len(digest))
	}
	if r := apply(t, f, 7, signed("e1", 1, 1, 2, 3)); r[0].Err != nil {
		t.Fatalf("re-send across the moved chain: %+v", r[0])
	}
	if r := apply(t, f, 8, signed("e1", 1, 1, 2, 8)); !errors.Is(r[0].Err, ErrSeqConflict) {
		t.Fatalf("squatted re-send across the moved chain: %+v", r[0])
	}
}
