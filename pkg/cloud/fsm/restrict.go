package fsm

import (
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
// it had in flight (four), so a few would do.
const digestWindow = 16

// An edge's sequence record (its edge_seq value) is its highest committed
// sequence (8 bytes, big-endian) followed by its chain: up to digestWindow
// entries of (push end sequence, big-endian; chain digest), oldest first.
// Every push rewrites the record anyway, so the chain costs no Put of its
// own. A record written before the chain moved there is the sequence
// alone, with the chain (if any) under the edge in edge_digest; the next
// push moves it (seqRecord, putSeq).
const chainEntry = 8 + wire.DigestSize

// seqRecord is edge's committed sequence and chain records, read from
// edge_seq or, for a record of the old layout, from edge_digest. The chain
// aliases bbolt's memory: valid in this transaction until its next write.
type seqRecord struct {
	last   uint64
	chain  []byte
	legacy bool // chain is edge_digest's
}

func readSeq(seq, digest *bolt.Bucket, edge []byte) seqRecord {
	v := seq.Get(edge)
	r := seqRecord{last: getU64(v)}
	if len(v) > 8 {
		r.chain = v[8:]
	} else if digest != nil {
		if r.chain = digest.Get(edge); r.chain != nil {
			r.legacy = true
		}
	}
	return r
}

// seqValue is edge's record after a push that ended at last: r's chain,
// plus (when head is set) head as the chain digest at last, the oldest
// forgotten beyond the window. It copies what it keeps of r.chain, so it
// may be built before the push's changes apply and put after (putSeq).
func seqValue(r seqRecord, last uint64, head *wire.Digest) []byte {
	old := r.chain
	if n := len(old) / chainEntry; head != nil && n >= digestWindow {
		old = old[(n-digestWindow+1)*chainEntry:]
	}
	v := make([]byte, 0, 8+len(old)+chainEntry)
	v = binary.BigEndian.AppendUint64(v, last)
	v = append(v, old...)
	if head != nil {
		v = binary.BigEndian.AppendUint64(v, last)
		v = append(v, head[:]...)
	}
	return v
}

// putSeq stores edge's record v; a chain read from edge_digest (r.legacy)
// has moved into it.
func putSeq(seq, digest *bolt.Bucket, edge []byte, r seqRecord, v []byte) error {
	if err := seq.Put(edge, v); err != nil {
		return err
	}
	if r.legacy {
		return digest.Delete(edge)
	}
	return nil
}

// chainEntries yields the records of chain (as putSeq writes it).
func chainEntries(chain []byte, yield func(seq uint64, d []byte) bool) {
	for len(chain) >= chainEntry {
		if !yield(binary.BigEndian.Uint64(chain), chain[8:chainEntry]) {
			return
		}
		chain = chain[chainEntry:]
	}
}

// chainAt is the chain digest of the stream through seq; the zero digest
// (and true) for seq 0, false if no push ended at seq within the window.
func chainAt(chain []byte, seq uint64) (wire.Digest, bool) {
	var d wire.Digest
	if seq == 0 {
		return d, true
	}
	found := false
	chainEntries(chain, func(s uint64, v []byte) bool {
		if s == seq {
			copy(d[:], v)
			found = true
		}
		return !found
	})
	return d, found
}

// verifyChain checks that digests (of changes first, first+1, …) repeat
// what edge's stream applied through r.last: the chain from the push end
// before first, over the re-sent changes, must reach the recorded value at
// the last push end they cover.
func verifyChain(r seqRecord, edge string, first uint64, digests []wire.Digest) error {
	hi := min(r.last, first+uint64(len(digests))-1)
	h, ok := chainAt(r.chain, first-1)
	end, want, ok2 := chainBefore(r.chain, first, hi)
	if (!ok || !ok2) && len(r.chain) == 0 {
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
func chainBefore(chain []byte, first, hi uint64) (uint64, wire.Digest, bool) {
	var d wire.Digest
	var end uint64
	ok := false
	chainEntries(chain, func(s uint64, v []byte) bool {
		if s >= first && s <= hi {
			end, ok = s, true
			copy(d[:], v)
		}
		return true
	})
	return end, d, ok
}

// CheckResend verifies, without proposing, that a push entirely at or
// below edge's acknowledged sequence repeats what was applied: nil for an
// idempotent duplicate, ErrSeqConflict otherwise.
func (f *FSM) CheckResend(edge string, first uint64, digests []wire.Digest) error {
	return f.view(func(tx *bolt.Tx) error {
		return verifyChain(readSeq(tx.Bucket(bktSeq), tx.Bucket(bktDigest), []byte(edge)), edge, first, digests)
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
