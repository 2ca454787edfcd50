package wire

import (
	"crypto/sha256"
	"encoding/binary"
	"math"
	"sort"
)

// DigestSize is the length of a change digest.
const DigestSize = 16

// Digest is a change's content fingerprint: what the cloud remembers of
// the sequence numbers it applied, so that a sequence number re-sent with
// the same content is an idempotent duplicate and one re-sent with other
// content (sequence squatting) is an error.
type Digest [DigestSize]byte

// Digest fingerprints c: a truncated SHA-256 of a canonical encoding of
// every field the edge sent (maps in key order), so equal changes have
// equal digests whatever their JSON looked like.
func (c *Change) Digest() Digest {
	b := make([]byte, 0, 256+48*len(c.Readings))
	str := func(s string) {
		b = binary.AppendUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	str(c.Kind)
	str(c.Device)
	str(c.Actor)
	str(c.Proof)
	b = binary.AppendUvarint(b, uint64(len(c.Readings)))
	var buf []Metric
	for i := range c.Readings {
		r := &c.Readings[i]
		b = binary.AppendVarint(b, r.TS)
		str(r.ID)
		ms := r.SortedMetrics(&buf)
		b = binary.AppendUvarint(b, uint64(len(ms)))
		for _, m := range ms {
			str(m.Name)
			b = binary.LittleEndian.AppendUint64(b, math.Float64bits(m.Value))
		}
	}
	var names []string
	for k := range c.Doc {
		names = append(names, k)
	}
	sort.Strings(names)
	b = binary.AppendUvarint(b, uint64(len(names)))
	for _, k := range names {
		f := c.Doc[k]
		str(k)
		b = binary.BigEndian.AppendUint64(b, uint64(f.Stamp))
		if f.Deleted {
			b = append(b, 1)
		} else {
			b = append(b, 0)
		}
		str(string(f.Value))
	}
	if m := c.Meta; m != nil {
		b = append(b, 1)
		b = binary.BigEndian.AppendUint64(b, uint64(m.Stamp))
		b = m.AppendCanonical(b)
	} else {
		b = append(b, 0)
	}
	if u := c.User; u != nil {
		b = append(b, 1)
		b = binary.BigEndian.AppendUint64(b, uint64(u.Stamp))
		b = u.AppendCanonical(b)
	} else {
		b = append(b, 0)
	}
	sum := sha256.Sum256(b)
	var d Digest
	copy(d[:], sum[:])
	return d
}

// ChainDigest extends the running digest of an edge's sequenced stream by
// one change: the cloud keeps the chain's value at the end of each applied
// push, so any re-sent run starting after one of those points can be
// checked against what was applied.
func ChainDigest(prev, next Digest) Digest {
	var b [2 * DigestSize]byte
	copy(b[:], prev[:])
	copy(b[DigestSize:], next[:])
	sum := sha256.Sum256(b[:])
	var d Digest
	copy(d[:], sum[:])
	return d
}
