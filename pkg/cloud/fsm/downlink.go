package fsm

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"sort"
	"sync"

	bolt "go.etcd.io/bbolt"

	"github.com/outpost-edge/outpost/pkg/wire"
)

// The downlink: cloud-side changes queued for edges to pull.
//
// Every entry is stored once in downlink under its position (raft index and
// a sequence within the entry: the pull cursor) and indexed under its
// target in downlink_target, so a pull reads only what is for its edge and
// the broadcasts ("*"): its cost follows what the edge is sent, not the
// fleet's traffic.
//
// Entries are deleted once they are no longer needed: an edge's own once its
// acknowledged pull position passed them, a broadcast once every edge's did,
// or once it is older than the maximum offline window (an edge away longer
// re-pulls from the start, and a pull from the start carries every user's
// current record, so nothing a broadcast carried is lost). A session
// revocation is kept until it expires. The positions arrive in CmdPullAcks,
// which the leader proposes from the cursors edges pull with; an edge pulls
// with the cursor of what it applied, so its position is what it has.

// PullAcks is the body of CmdPullAcks: the position each edge acknowledged
// (the cursor it pulled with), and the maximum offline window, both decided
// by the leader so that every replica deletes the same entries.
type PullAcks struct {
	Edges        map[string]string `json:"edges"`
	MaxOfflineMs int64             `json:"max_offline_ms"`
}

// maxDeletesPerAck bounds the deletions of one CmdPullAcks; what is left
// goes with the next.
const maxDeletesPerAck = 20000

const posLen = 12 // raft index(8) sub(4)

func targetKey(target string, pos []byte) []byte {
	k := make([]byte, 0, len(target)+1+posLen)
	return append(append(append(k, target...), 0), pos...)
}

// downlink queues c for target ("*": every edge) and indexes it.
func (a *applier) downlink(target, origin string, c wire.Change) error {
	k := binary.BigEndian.AppendUint32(u64(a.index), a.downSub)
	a.downSub++
	v, err := json.Marshal(downRecord{Target: target, Origin: origin, Change: c, AtMs: a.atMs})
	if err != nil {
		return err
	}
	if err := a.bk.down.Put(k, v); err != nil {
		return err
	}
	if target == "*" {
		a.broadcast = true
	} else {
		if a.targets == nil {
			a.targets = map[string]bool{}
		}
		a.targets[target] = true
	}
	return a.bk.downIdx.Put(targetKey(target, k), nil)
}

// indexDownlink builds downlink_target from downlink when a state written
// before the index existed is opened (or restored); the index is derived
// from the state, so every replica builds the same.
func indexDownlink(tx *bolt.Tx) error {
	idx, down := tx.Bucket(bktDownIdx), tx.Bucket(bktDown)
	if k, _ := idx.Cursor().First(); k != nil {
		return nil
	}
	type ent struct {
		target string
		pos    []byte
	}
	var all []ent
	err := down.ForEach(func(k, v []byte) error {
		var r downRecord
		if err := json.Unmarshal(v, &r); err != nil {
			return err
		}
		all = append(all, ent{r.Target, append([]byte(nil), k...)})
		return nil
	})
	if err != nil {
		return err
	}
	for _, e := range all {
		if err := idx.Put(targetKey(e.target, e.pos), nil); err != nil {
			return err
		}
	}
	return nil
}

func decodePullCursor(cursor string) ([]byte, error) {
	if cursor == "" {
		return nil, nil
	}
	k, err := base64.RawURLEncoding.DecodeString(cursor)
	if err != nil || len(k) != posLen {
		return nil, fmt.Errorf("%w: pull cursor %q", ErrBadCursor, cursor)
	}
	return k, nil
}

// targetIter walks one target's index entries after a position.
type targetIter struct {
	c      *bolt.Cursor
	prefix []byte
	pos    []byte // current position; nil when done
}

func newTargetIter(idx *bolt.Bucket, target string, after []byte) *targetIter {
	it := &targetIter{c: idx.Cursor(), prefix: append([]byte(target), 0)}
	seek := targetKey(target, after)
	k, _ := it.c.Seek(seek)
	if k != nil && after != nil && bytes.Equal(k, seek) {
		k, _ = it.c.Next()
	}
	it.set(k)
	return it
}

func (it *targetIter) set(k []byte) {
	if k == nil || !bytes.HasPrefix(k, it.prefix) || len(k) != len(it.prefix)+posLen {
		it.pos = nil
		return
	}
	it.pos = k[len(it.prefix):]
}

func (it *targetIter) next() {
	k, _ := it.c.Next()
	it.set(k)
}

// Pull returns the cloud-side changes addressed to edge after cursor, at
// most limit of them. A pull from the start ("") begins with every user's
// current record (the broadcasts that carried them may be gone), and its
// last page's cursor is the applied index, so the next pull does not
// start over.
func (f *FSM) Pull(edge, cursor string, limit int) (wire.PullPage, error) {
	page := wire.PullPage{Changes: []wire.Change{}, NextCursor: cursor}
	after, err := decodePullCursor(cursor)
	if err != nil {
		return page, err
	}
	err = f.view(func(tx *bolt.Tx) error {
		if cursor == "" {
			if err := tx.Bucket(bktUsers).ForEach(func(_, v []byte) error {
				var u wire.User
				if err := json.Unmarshal(v, &u); err != nil {
					return err
				}
				page.Changes = append(page.Changes, wire.Change{Kind: wire.KindUser, User: &u})
				return nil
			}); err != nil {
				return err
			}
		}
		idx, down := tx.Bucket(bktDownIdx), tx.Bucket(bktDown)
		own, all := newTargetIter(idx, edge, after), newTargetIter(idx, "*", after)
		n := 0
		for own.pos != nil || all.pos != nil {
			it := own
			if own.pos == nil || all.pos != nil && bytes.Compare(all.pos, own.pos) < 0 {
				it = all
			}
			if n == limit {
				page.More = true
				break
			}
			n++
			pos := it.pos
			page.NextCursor = base64.RawURLEncoding.EncodeToString(pos)
			v := down.Get(pos)
			it.next()
			if v == nil {
				continue
			}
			var r downRecord
			if err := json.Unmarshal(v, &r); err != nil {
				return err
			}
			if r.Origin != edge {
				page.Changes = append(page.Changes, r.Change)
			}
		}
		if cursor == "" && !page.More {
			// The snapshot of users stands for everything up to the
			// applied index: the next pull starts after it, whether or not
			// any entry was for this edge, so the snapshot is not sent
			// again.
			at := binary.BigEndian.AppendUint32(u64(getU64(tx.Bucket(bktMeta).Get(keyApplied))), ^uint32(0))
			if page.NextCursor == "" || bytes.Compare(at, mustDecode(page.NextCursor)) > 0 {
				page.NextCursor = base64.RawURLEncoding.EncodeToString(at)
			}
		}
		return nil
	})
	return page, err
}

func mustDecode(cursor string) []byte {
	k, _ := base64.RawURLEncoding.DecodeString(cursor)
	return k
}

// PullPosition is the pull position edge acknowledged in the replicated
// state ("" if none), for tests and tooling.
func (f *FSM) PullPosition(edge string) string {
	var s string
	_ = f.view(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bktPulled).Get([]byte(edge)); len(v) >= posLen {
			s = base64.RawURLEncoding.EncodeToString(v[:posLen])
		}
		return nil
	})
	return s
}

// DownlinkLen counts the queued downlink entries, for tests and metrics.
func (f *FSM) DownlinkLen() int {
	n := 0
	_ = f.view(func(tx *bolt.Tx) error {
		n = tx.Bucket(bktDown).Stats().KeyN
		return nil
	})
	return n
}

// pullAcks records the positions and deletes the entries behind them.
func (a *applier) pullAcks(p *PullAcks) (Result, error) {
	if p == nil {
		return Result{}, nil
	}
	edges := make([]string, 0, len(p.Edges))
	for e := range p.Edges {
		edges = append(edges, e)
	}
	sort.Strings(edges) // map order is not deterministic
	budget := maxDeletesPerAck
	deleted := 0
	for _, e := range edges {
		pos, err := decodePullCursor(p.Edges[e])
		if err != nil || pos == nil || !validDeviceKey(e) {
			continue
		}
		if old := a.bk.pulled.Get([]byte(e)); len(old) >= posLen && bytes.Compare(old[:posLen], pos) > 0 {
			pos = append([]byte(nil), old[:posLen]...) // positions only move forward
		}
		v := binary.BigEndian.AppendUint64(append(make([]byte, 0, posLen+8), pos...), uint64(a.atMs))
		if err := a.bk.pulled.Put([]byte(e), v); err != nil {
			return Result{}, err
		}
		n, err := a.trimTarget(e, func(k []byte, _ *downRecord) bool { return bytes.Compare(k, pos) <= 0 }, budget)
		if err != nil {
			return Result{}, err
		}
		budget -= n
		deleted += n
	}
	n, err := a.trimBroadcasts(p.MaxOfflineMs, budget)
	return Result{Applied: deleted + n}, err
}

// trimBroadcasts deletes the broadcasts every edge's position passed, and
// those older than the maximum offline window, except session revocations
// that have not expired. An edge with a directory record but no position
// (or a pushed sequence) but no position holds back the first rule (it may
// still need everything); one whose
// position is older than the window does not (it re-pulls from the start).
func (a *applier) trimBroadcasts(maxOfflineMs int64, budget int) (int, error) {
	var low []byte
	first := true
	consider := func(pos []byte) {
		if first || bytes.Compare(pos, low) < 0 {
			low = pos
		}
		first = false
	}
	cut := a.atMs - maxOfflineMs
	if err := a.bk.pulled.ForEach(func(_, v []byte) error {
		if len(v) == posLen+8 && (maxOfflineMs <= 0 || int64(binary.BigEndian.Uint64(v[posLen:])) >= cut) {
			consider(append([]byte(nil), v[:posLen]...))
		}
		return nil
	}); err != nil {
		return 0, err
	}
	for _, known := range []*bolt.Bucket{a.bk.edges, a.bk.seq} {
		if err := known.ForEach(func(k, _ []byte) error {
			if a.bk.pulled.Get(k) == nil {
				consider(make([]byte, posLen))
			}
			return nil
		}); err != nil {
			return 0, err
		}
	}
	return a.trimTarget("*", func(k []byte, r *downRecord) bool {
		if r.Change.Kind == wire.KindSessions && r.Change.Sessions != nil && r.Change.Sessions.UntilMs > a.atMs {
			return false
		}
		passed := !first && bytes.Compare(k, low) <= 0
		old := maxOfflineMs > 0 && r.AtMs > 0 && r.AtMs < cut
		return passed || old
	}, budget)
}

// trimTarget deletes target's entries, oldest first, while del says so (a
// false answer for a kept session revocation is skipped over; any other
// false ends the walk), at most budget.
func (a *applier) trimTarget(target string, del func(pos []byte, r *downRecord) bool, budget int) (int, error) {
	prefix := append([]byte(target), 0)
	var doomed [][]byte
	c := a.bk.downIdx.Cursor()
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix) && len(doomed) < budget; k, _ = c.Next() {
		if len(k) != len(prefix)+posLen {
			continue
		}
		pos := k[len(prefix):]
		var r downRecord
		if v := a.bk.down.Get(pos); v != nil {
			if err := json.Unmarshal(v, &r); err != nil {
				return 0, err
			}
		}
		if !del(pos, &r) {
			if r.Change.Kind == wire.KindSessions {
				continue
			}
			break
		}
		doomed = append(doomed, append([]byte(nil), k...))
	}
	for _, k := range doomed {
		if err := a.bk.downIdx.Delete(k); err != nil {
			return 0, err
		}
		if err := a.bk.down.Delete(k[len(prefix):]); err != nil {
			return 0, err
		}
	}
	return len(doomed), nil
}

// pullHub wakes held pulls: each waiting edge has a channel, closed when an
// entry for it commits; a broadcast (or a change to a set pulls carry)
// closes them all.
type pullHub struct {
	mu    sync.Mutex
	edges map[string]chan struct{}
}

func newPullHub() pullHub { return pullHub{edges: map[string]chan struct{}{}} }

func (h *pullHub) watch(edge string) <-chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	ch, ok := h.edges[edge]
	if !ok {
		ch = make(chan struct{})
		h.edges[edge] = ch
	}
	return ch
}

func (h *pullHub) wake(targets map[string]bool, all bool) {
	if len(targets) == 0 && !all {
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if all {
		for e, ch := range h.edges {
			close(ch)
			delete(h.edges, e)
		}
		return
	}
	for e := range targets {
		if ch, ok := h.edges[e]; ok {
			close(ch)
			delete(h.edges, e)
		}
	}
}

// PullWatch returns a channel closed when something a pull of edge carries
// next commits: a downlink entry for it or for every edge, a policy or the
// signing key (or a snapshot is restored). Directory records do not close
// it: the service coalesces directory changes. Take it before reading,
// then wait.
func (f *FSM) PullWatch(edge string) <-chan struct{} { return f.pulls.watch(edge) }

// EdgesIndex is the last applied index that may have changed an edge's
// directory record; SetsIndex likewise for the policies and the signing
// key. Both only grow.
func (f *FSM) EdgesIndex() uint64 { return f.edgesIndex.Load() }

// SetsIndex: see EdgesIndex.
func (f *FSM) SetsIndex() uint64 { return f.setsIndex.Load() }
