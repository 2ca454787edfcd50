// Package shadow holds a device's reported or desired state as a map of fields,
// each stamped with a hybrid logical clock and merged last-writer-wins, with
// deletions kept as tombstones. Merge is commutative, associative and
// idempotent, so edge and cloud converge whatever order syncs arrive in.
package shadow

import (
	"bytes"
	"encoding/json"
	"sort"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/lww"
)

// Field is one state field. A deleted field keeps its stamp as a tombstone so
// that an older write arriving later cannot resurrect it.
type Field struct {
	Value   json.RawMessage `json:"v,omitempty"`
	Stamp   hlc.Timestamp   `json:"t"`
	Deleted bool            `json:"d,omitempty"`
}

// LWWStamp implements lww.Record.
func (f Field) LWWStamp() hlc.Timestamp { return f.Stamp }

// AppendCanonical implements lww.Record: a tombstone sorts above every
// value, so a delete beats a write with the same stamp; values compare in
// their canonical JSON form.
func (f Field) AppendCanonical(b []byte) []byte {
	if f.Deleted {
		return append(b, 1)
	}
	return lww.AppendJSON(append(b, 0), f.Value)
}

// wins reports whether f should replace g (lww: later stamp, then content).
func (f Field) wins(g Field) bool { return lww.Wins(f, g) }

// Doc is a device state document: field name to stamped value.
type Doc map[string]Field

// Merge folds other into d field by field, last writer wins, and returns the
// names of the fields that changed.
func (d Doc) Merge(other Doc) []string {
	var changed []string
	for k, f := range other {
		cur, ok := d[k]
		if !ok || f.wins(cur) {
			d[k] = f
			changed = append(changed, k)
		}
	}
	sort.Strings(changed)
	return changed
}

// Set writes one field at stamp; a nil or JSON null value deletes the field.
func (d Doc) Set(name string, value json.RawMessage, stamp hlc.Timestamp) bool {
	f := Field{Stamp: stamp}
	if len(value) == 0 || bytes.Equal(bytes.TrimSpace(value), []byte("null")) {
		f.Deleted = true
	} else {
		f.Value = append(json.RawMessage(nil), value...)
	}
	return len(d.Merge(Doc{name: f})) > 0
}

// Patch builds a document from a JSON object of field values, stamping every
// field with stamp; null values become tombstones.
func Patch(state map[string]json.RawMessage, stamp hlc.Timestamp) Doc {
	d := make(Doc, len(state))
	for k, v := range state {
		d.Set(k, v, stamp)
	}
	return d
}

// State returns the live fields as a plain JSON object, without tombstones.
func (d Doc) State() map[string]json.RawMessage {
	out := make(map[string]json.RawMessage, len(d))
	for k, f := range d {
		if !f.Deleted {
			out[k] = f.Value
		}
	}
	return out
}

// Version is the greatest stamp in d, a cheap version for clients and for
// ordering downlinks.
func (d Doc) Version() hlc.Timestamp {
	var v hlc.Timestamp
	for _, f := range d {
		if f.Stamp > v {
			v = f.Stamp
		}
	}
	return v
}

// Since returns the fields stamped after t, tombstones included: the delta a
// peer that has seen everything up to t needs.
func (d Doc) Since(t hlc.Timestamp) Doc {
	out := Doc{}
	for k, f := range d {
		if f.Stamp > t {
			out[k] = f
		}
	}
	return out
}

// PurgeTombstones drops tombstones stamped before cutoff. Call it only with a
// cutoff older than the longest offline window any peer may have, or a
// long-offline peer could resurrect the deleted field.
func (d Doc) PurgeTombstones(cutoff hlc.Timestamp) int {
	n := 0
	for k, f := range d {
		if f.Deleted && f.Stamp < cutoff {
			delete(d, k)
			n++
		}
	}
	return n
}

// Clone returns a deep copy of d.
func (d Doc) Clone() Doc {
	out := make(Doc, len(d))
	for k, f := range d {
		f.Value = append(json.RawMessage(nil), f.Value...)
		out[k] = f
	}
	return out
}
