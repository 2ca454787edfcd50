package fsm

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"

	bolt "go.etcd.io/bbolt"

	"github.com/outpost-edge/outpost/pkg/lww"
	"github.com/outpost-edge/outpost/pkg/shadow"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Edge restriction in the state machine. Whether an edge's change is
// allowed is decided before proposing, on the node that received it
// (verifying a proof reads the wall clock and the policy engine, which
// Apply must not): a refused change travels in the log as a refusal
// (Command.Refusals), and Apply turns it into a correction, which is
// deterministic. Sequence records (the digest chain) are checked here,
// in Apply, because they depend only on the log.

// digestWindow is how many push ends per edge keep their chain digest: a
// re-send may start after any of them. An edge re-sends at most the pushes
// it had in flight, so a few would do.
const digestWindow = 64

func chainKey(edge string, seq uint64) []byte {
	k := make([]byte, 0, len(edge)+9)
	k = append(append(k, edge...), 0)
	return binary.BigEndian.AppendUint64(k, seq)
}

// chainAt is the chain digest of edge's stream through seq; the zero digest
// (and true) for seq 0, false if no push ended at seq within the window.
func chainAt(b *bolt.Bucket, edge string, seq uint64) (wire.Digest, bool) {
	var d wire.Digest
	if seq == 0 {
		return d, true
	}
	v := b.Get(chainKey(edge, seq))
	if len(v) != wire.DigestSize {
		return d, false
	}
	copy(d[:], v)
	return d, true
}

// putChain records the chain digest at the end of a push and forgets the
// oldest beyond the window.
func putChain(b *bolt.Bucket, edge string, seq uint64, d wire.Digest) error {
	if err := b.Put(chainKey(edge, seq), append([]byte(nil), d[:]...)); err != nil {
		return err
	}
	// Every push of every edge comes here, so the window is trimmed
	// without copying keys: count the edge's records, then delete the
	// oldest through the cursor (normally exactly one).
	prefix := append([]byte(edge), 0)
	c := b.Cursor()
	n := 0
	for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = c.Next() {
		n++
	}
	for ; n > digestWindow; n-- {
		if k, _ := c.Seek(prefix); k == nil || !bytes.HasPrefix(k, prefix) {
			break
		}
		if err := c.Delete(); err != nil {
			return err
		}
	}
	return nil
}

// verifyChain checks that digests (of changes first, first+1, …) repeat
// what edge's stream applied through last: the chain from the push end
// before first, over the re-sent changes, must reach the recorded value at
// the last push end they cover.
func verifyChain(b *bolt.Bucket, edge string, first, last uint64, digests []wire.Digest) error {
	hi := min(last, first+uint64(len(digests))-1)
	h, ok := chainAt(b, edge, first-1)
	end, want, ok2 := chainBefore(b, edge, first, hi)
	if (!ok || !ok2) && !hasChain(b, edge) {
		// The edge's pushes all predate sequence records (an upgraded
		// cluster): there is nothing to compare with.
		return nil
	}
	if !ok || !ok2 {
		return fmt.Errorf("%w: sequences %d to %d of edge %q do not start and end where the cloud's record of its pushes does; they cannot be checked (re-send from the last acknowledged sequence)",
			ErrSeqConflict, first, hi, edge)
	}
	for i := uint64(0); i <= end-first; i++ {
		h = wire.ChainDigest(h, digests[i])
	}
	if h != want {
		return fmt.Errorf("%w: sequences %d to %d of edge %q were already applied with other content (another holder of this edge's token, or two edges with one id)",
			ErrSeqConflict, first, end, edge)
	}
	return nil
}

// chainBefore is the newest recorded push end in [first, hi] and its chain
// digest.
func chainBefore(b *bolt.Bucket, edge string, first, hi uint64) (uint64, wire.Digest, bool) {
	var d wire.Digest
	c := b.Cursor()
	var k, v []byte
	if k, _ = c.Seek(chainKey(edge, hi+1)); k == nil {
		k, v = c.Last()
	} else {
		k, v = c.Prev()
	}
	prefix := append([]byte(edge), 0)
	if k == nil || !bytes.HasPrefix(k, prefix) || len(k) != len(prefix)+8 || len(v) != wire.DigestSize {
		return 0, d, false
	}
	seq := binary.BigEndian.Uint64(k[len(prefix):])
	if seq < first || seq > hi {
		return 0, d, false
	}
	copy(d[:], v)
	return seq, d, true
}

func hasChain(b *bolt.Bucket, edge string) bool {
	prefix := append([]byte(edge), 0)
	k, _ := b.Cursor().Seek(prefix)
	return k != nil && bytes.HasPrefix(k, prefix)
}

// CheckResend verifies, without proposing, that a push entirely at or
// below edge's acknowledged sequence repeats what was applied: nil for an
// idempotent duplicate, ErrSeqConflict otherwise.
func (f *FSM) CheckResend(edge string, first uint64, digests []wire.Digest) error {
	return f.view(func(tx *bolt.Tx) error {
		last := getU64(tx.Bucket(bktSeq).Get([]byte(edge)))
		return verifyChain(tx.Bucket(bktDigest), edge, first, last, digests)
	})
}

// correct applies a refused change as its correction: the cloud's current
// value of what the change named (the desired fields, the meta record, the
// user), re-stamped with the refusal's stamp so that it wins at the edge
// that sent it, stored so that the cloud keeps the same, and queued for
// that edge and the device's home. Edge and cloud then converge on the
// cloud's value.
func (a *applier) correct(origin string, atMs int64, r *refusedChange) error {
	switch r.Kind {
	case wire.KindUser:
		if r.OpenID == "" {
			return nil
		}
		u := wire.User{OpenID: r.OpenID, Roles: []string{}, Stamp: r.Correct}
		if v := a.bk.users.Get([]byte(r.OpenID)); v != nil {
			var cur wire.User
			if err := json.Unmarshal(v, &cur); err != nil {
				return fmt.Errorf("decode user %s: %w", r.OpenID, err)
			}
			u.Roles, u.Regions = cur.Roles, cur.Regions
		}
		_, err := a.user("", &u)
		return err
	case wire.KindDesired, wire.KindMeta:
	default:
		return nil // readings and reported state are never refused
	}
	if !validDeviceKey(r.Device) {
		return nil
	}
	dev, err := a.device(r.Device, atMs)
	if err != nil {
		return err
	}
	out := wire.Change{Kind: r.Kind, Device: dev.ID}
	if r.Kind == wire.KindDesired {
		delta := make(shadow.Doc, len(r.Fields))
		for _, k := range r.Fields {
			f, ok := dev.Desired[k]
			if !ok {
				f = shadow.Field{Deleted: true}
			}
			f.Stamp = r.Correct
			delta[k] = f
		}
		changed := dev.Desired.Merge(delta)
		if len(changed) == 0 {
			return nil
		}
		out.Doc = make(shadow.Doc, len(changed))
		for _, k := range changed {
			out.Doc[k] = dev.Desired[k]
		}
	} else {
		m := wire.Meta{Owners: dev.Owners, Region: dev.Region, Tags: dev.Tags, Stamp: r.Correct}
		if lww.Compare(m, wire.Meta{Owners: dev.Owners, Region: dev.Region, Tags: dev.Tags, Stamp: dev.MetaStamp}) <= 0 {
			return nil
		}
		dev.MetaStamp = r.Correct
		out.Meta = &m
	}
	a.changed(dev)
	if r.Correct > a.maxStamp {
		a.maxStamp = r.Correct
	}
	if err := a.logChange("", atMs, &rawChange{Kind: r.Kind, Device: dev.ID, Other: &out}); err != nil {
		return err
	}
	if origin != "" {
		if err := a.downlink(origin, "", out); err != nil {
			return err
		}
	}
	if dev.EdgeID != "" && dev.EdgeID != origin {
		return a.downlink(dev.EdgeID, "", out)
	}
	return nil
}
