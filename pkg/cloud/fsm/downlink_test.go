package fsm

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/shadow"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// home makes device dev live at edge: its first push there.
func home(t *testing.T, f *FSM, index uint64, edge, dev string) {
	t.Helper()
	apply(t, f, index, &Command{Type: CmdPush, AtMs: 1000, Push: &wire.PushBatch{Edge: edge, FirstSeq: 1,
		Changes: []wire.Change{{Kind: wire.KindReadings, Device: dev, Readings: []wire.Reading{rd(1, "")}}}}})
}

func desired(dev string, atMs int64, field string) *Command {
	return &Command{Type: CmdDesired, AtMs: atMs, Change: &wire.Change{Kind: wire.KindDesired, Device: dev,
		Doc: shadow.Doc{field: {Value: []byte(`1`), Stamp: hlc.New(atMs, 0)}}}}
}

func userPut(openid string, atMs int64) *Command {
	return &Command{Type: CmdUserPut, AtMs: atMs, User: &wire.User{OpenID: openid, Roles: []string{"viewer"}, Stamp: hlc.New(atMs, 0)}}
}

// An edge's pull reads only its own entries and the broadcasts, in commit
// order, however many entries other edges have.
func TestPullReadsOnlyItsEdgesEntries(t *testing.T) {
	f := open(t)
	home(t, f, 1, "e1", "d1")
	home(t, f, 2, "e2", "d2")
	idx := uint64(3)
	for i := 0; i < 50; i++ { // traffic for e2
		apply(t, f, idx, desired("d2", int64(2000+i), fmt.Sprintf("f%d", i)))
		idx++
	}
	apply(t, f, idx, desired("d1", 3000, "a"))
	apply(t, f, idx+1, userPut("alice", 3001))
	apply(t, f, idx+2, desired("d1", 3002, "b"))
	page, err := f.Pull("e1", "", 100)
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, c := range page.Changes {
		kinds = append(kinds, c.Kind)
	}
	// The pull from the start opens with every user's record, then the log.
	want := []string{wire.KindUser, wire.KindDesired, wire.KindUser, wire.KindDesired}
	if fmt.Sprint(kinds) != fmt.Sprint(want) {
		t.Fatalf("e1 pulled %v, want %v", kinds, want)
	}
	// Paging: limit counts scanned entries; the cursor resumes, and after
	// a pull from the start it is never "" (the users are not sent again).
	p1, _ := f.Pull("e1", page.NextCursor, 10)
	if len(p1.Changes) != 0 || p1.More || p1.NextCursor != page.NextCursor {
		t.Fatalf("pull after the last entry: %+v", p1)
	}
	first, _ := f.Pull("e2", "", 20)
	if !first.More || len(first.Changes) != 21 { // alice's record, 20 entries
		t.Fatalf("e2 first page: %d changes, more %v", len(first.Changes), first.More)
	}
	rest, _ := f.Pull("e2", first.NextCursor, 100)
	if rest.More || len(rest.Changes) != 31 { // 30 desired, the user broadcast
		t.Fatalf("e2 rest: %d changes, more %v", len(rest.Changes), rest.More)
	}
	// An edge nothing was ever queued for: its first pull carries the
	// users and a cursor, its next nothing.
	p3, _ := f.Pull("e3", "", 100)
	if len(p3.Changes) != 2 || p3.NextCursor == "" { // alice's record, then the alice broadcast
		t.Fatalf("e3's first pull: %d changes, cursor %q", len(p3.Changes), p3.NextCursor)
	}
	if p4, _ := f.Pull("e3", p3.NextCursor, 100); len(p4.Changes) != 0 || p4.NextCursor != p3.NextCursor {
		t.Fatalf("e3's second pull: %+v", p4)
	}
}

// Acknowledged pull positions delete what is behind them: an edge's own
// entries at once, a broadcast when every edge passed it or it is older
// than max_offline; a pull from an old position still sees everything
// after it.
func TestPullAcksDeleteDownlink(t *testing.T) {
	f := open(t)
	home(t, f, 1, "e1", "d1")
	home(t, f, 2, "e2", "d2")
	apply(t, f, 3, desired("d1", 3000, "a"))
	apply(t, f, 4, desired("d2", 3001, "a"))
	apply(t, f, 5, userPut("alice", 3002))
	apply(t, f, 6, desired("d1", 3003, "b"))
	if n := f.DownlinkLen(); n != 4 {
		t.Fatalf("%d entries queued, want 4", n)
	}
	p1, _ := f.Pull("e1", "", 100) // d1 a, alice, d1 b
	ack := func(index uint64, atMs int64, edges map[string]string) Result {
		t.Helper()
		return apply(t, f, index, &Command{Type: CmdPullAcks, AtMs: atMs,
			PullAcks: &PullAcks{Edges: edges, MaxOfflineMs: 10_000}})[0]
	}
	// e1 acknowledges all of it: its two entries go; the broadcast stays
	// for e2, which has not pulled.
	if r := ack(7, 4000, map[string]string{"e1": p1.NextCursor}); r.Applied != 2 {
		t.Fatalf("first ack deleted %d entries, want 2", r.Applied)
	}
	if f.PullPosition("e1") != p1.NextCursor || f.DownlinkLen() != 2 {
		t.Fatalf("position %q, %d entries left", f.PullPosition("e1"), f.DownlinkLen())
	}
	p2, _ := f.Pull("e2", "", 100)
	if len(p2.Changes) != 3 { // alice's record, d2 a, the alice broadcast
		t.Fatalf("e2 pulled %d changes, want 3", len(p2.Changes))
	}
	// e2's position passes the broadcast too: everything goes.
	if r := ack(8, 4001, map[string]string{"e2": p2.NextCursor}); r.Applied != 2 || f.DownlinkLen() != 0 {
		t.Fatalf("second ack deleted %d, %d left", r.Applied, f.DownlinkLen())
	}
	// A position never moves back.
	ack(9, 4002, map[string]string{"e1": "AAAAAAAAAAAAAAAA"})
	if f.PullPosition("e1") != p1.NextCursor {
		t.Fatal("an older acknowledged position moved the recorded one back")
	}
	// A broadcast older than max_offline goes although e3 never pulled;
	// e1's newer entry is kept.
	home(t, f, 10, "e3", "d3")
	apply(t, f, 11, userPut("bob", 5000))
	apply(t, f, 12, desired("d1", 5001, "c"))
	if r := ack(13, 5002, map[string]string{"e1": p1.NextCursor}); r.Applied != 0 {
		t.Fatalf("deleted %d before max_offline, want 0", r.Applied)
	}
	if r := ack(14, 5000+10_001, map[string]string{"e2": p2.NextCursor}); r.Applied != 1 {
		t.Fatalf("deleted %d after max_offline, want the one broadcast", r.Applied)
	}
	p3, _ := f.Pull("e1", p1.NextCursor, 100)
	if len(p3.Changes) != 1 || p3.Changes[0].Kind != wire.KindDesired {
		t.Fatalf("e1's unacknowledged entry: %+v", p3.Changes)
	}
}

// A state written before the per-edge index existed is indexed on open.
func TestDownlinkIndexedOnOpen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state.db")
	f, err := Open(path, discardLog(), Hooks{})
	if err != nil {
		t.Fatal(err)
	}
	home(t, f, 1, "e1", "d1")
	apply(t, f, 2, desired("d1", 3000, "a"))
	apply(t, f, 3, userPut("alice", 3001))
	// Drop the index, as an older release's state has none.
	if err := f.db.Update(func(tx *bolt.Tx) error {
		if err := tx.DeleteBucket(bktDownIdx); err != nil {
			return err
		}
		_, err := tx.CreateBucket(bktDownIdx)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	_ = f.Close()
	if f, err = Open(path, discardLog(), Hooks{}); err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	page, err := f.Pull("e1", "", 100)
	if err != nil || len(page.Changes) != 3 { // alice's record, d1 a, alice
		b, _ := json.Marshal(page)
		t.Fatalf("pull after reindex: %s %v", b, err)
	}
}

// PullWatch fires for the edge's own entries and broadcasts, not for
// other edges'.
func TestPullWatch(t *testing.T) {
	f := open(t)
	home(t, f, 1, "e1", "d1")
	home(t, f, 2, "e2", "d2")
	w := f.PullWatch("e1")
	apply(t, f, 3, desired("d2", 3000, "a"))
	select {
	case <-w:
		t.Fatal("e1's watch fired for e2's entry")
	default:
	}
	apply(t, f, 4, desired("d1", 3001, "a"))
	select {
	case <-w:
	default:
		t.Fatal("e1's watch did not fire for its entry")
	}
	w = f.PullWatch("e1")
	apply(t, f, 5, userPut("alice", 3002))
	select {
	case <-w:
	default:
		t.Fatal("e1's watch did not fire for a broadcast")
	}
}

func discardLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }
