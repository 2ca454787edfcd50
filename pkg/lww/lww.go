// Package lww is the one last-writer-wins order Outpost uses for every
// replicated record: shadow state fields, device meta, users, and whatever
// record kind is added later (rules, alerts, policies). The edge's store and
// the cloud's state machine both decide "does this write replace that one"
// here, so they cannot disagree.
//
// The order is: the later HLC stamp wins; equal stamps (two writers in the
// same millisecond with the same counter — stamps carry no node id) are
// broken by comparing the records' canonical encodings byte-wise. A canonical
// encoding is a pure function of a record's content, injective (different
// content never encodes equal) and independent of how either side happens to
// store the record (nil or empty lists, map order, JSON spelling), so every
// replica breaks a tie the same way whatever order the writes arrive in.
//
// Why a canonical encoding rather than a node id in the stamp: the stamp is
// already on disk and on the wire at both ends as 64 bits, and a node id
// would need a format change of both; the content is what both sides have
// anyway. Two equal encodings with equal stamps are the same write, which
// is exactly when neither should replace the other.
//
// The package is pure: it imports hlc and the standard library only, so the
// other shared packages (shadow, wire) build on it.
package lww

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"sort"

	"github.com/outpost-edge/outpost/pkg/hlc"
)

// Record is one version of a last-writer-wins record.
type Record interface {
	// LWWStamp is the record's HLC stamp.
	LWWStamp() hlc.Timestamp
	// AppendCanonical appends the record's canonical content encoding
	// (without the stamp) to b.
	AppendCanonical(b []byte) []byte
}

// Compare orders two versions of one record: negative if a loses to b, zero
// if they are the same write, positive if a replaces b.
func Compare[R Record](a, b R) int {
	if sa, sb := a.LWWStamp(), b.LWWStamp(); sa != sb {
		if sa > sb {
			return 1
		}
		return -1
	}
	var ba, bb [256]byte
	return bytes.Compare(a.AppendCanonical(ba[:0]), b.AppendCanonical(bb[:0]))
}

// Wins reports whether a replaces b.
func Wins[R Record](a, b R) bool { return Compare(a, b) > 0 }

// The helpers below build canonical encodings. Every piece is length- or
// count-prefixed, which makes the concatenation injective.

// AppendString appends s with its length.
func AppendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

// AppendStrings appends a list in its order (order is content); nil and
// empty encode the same.
func AppendStrings(b []byte, l []string) []byte {
	b = binary.AppendUvarint(b, uint64(len(l)))
	for _, s := range l {
		b = AppendString(b, s)
	}
	return b
}

// AppendStringMap appends a map's pairs in key order; nil and empty encode
// the same.
func AppendStringMap(b []byte, m map[string]string) []byte {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	b = binary.AppendUvarint(b, uint64(len(keys)))
	for _, k := range keys {
		b = AppendString(AppendString(b, k), m[k])
	}
	return b
}

// AppendJSON appends a JSON value in the form encoding/json stores a
// json.RawMessage (compacted, HTML characters escaped), so a value compares
// the same before and after a trip through either side's storage. Invalid
// JSON (which validation keeps out) is appended as is.
func AppendJSON(b []byte, v []byte) []byte {
	var c bytes.Buffer
	if err := json.Compact(&c, v); err != nil {
		return AppendString(b, string(v))
	}
	var e bytes.Buffer
	json.HTMLEscape(&e, c.Bytes())
	return AppendString(b, e.String())
}
