package wire

import (
	"encoding/json"
	"errors"
	"sort"

	"github.com/outpost-edge/outpost/pkg/ident"
	"github.com/outpost-edge/outpost/pkg/shadow"
)

// Limits on device meta and state. The edge's API and MQTT ingest and the
// cloud's API enforce the same numbers with the same messages, so a write
// one side accepts the other accepts too. The sync path checks field counts
// and names but not value sizes: a change an edge already stored must not
// stall its sequenced stream at the cloud.
const (
	MaxOwners      = 256 // owners of one device, each an openid (ident.OpenID)
	MaxTags        = 64  // tags of one device
	MaxTagKey      = 64  // bytes; keys match [A-Za-z0-9._-]
	MaxTagValue    = 256 // bytes
	MaxRegion      = 64  // bytes; regions match [A-Za-z0-9._-]
	MaxStateFields = 256 // fields in one state write or sync delta
	MaxFieldName   = 128 // bytes
	MaxValueBytes  = 16 << 10
	// MaxRequestBytes bounds the body of a consumer API write: the edge's
	// default body limit, and what the cloud applies to its consumer
	// routes (its own body limit is MaxBodyBytes, for sync pushes).
	MaxRequestBytes = 64 << 10
)

// MaxAuthRequestBytes bounds the body of a login or refresh, at the edge
// and at the cloud: read before anyone is authenticated, and a code or a
// refresh token is far smaller.
const MaxAuthRequestBytes = 4 << 10

// ErrTooLarge marks a request or value over a size limit; HTTP answers 413.
var ErrTooLarge = errors.New("too large")

// BodyTooLarge is the error for a request body over limit bytes, worded the
// same at the edge and at the cloud.
func BodyTooLarge(limit int) error {
	return tooLarge("request body too large: at most %d bytes", limit)
}

// Validate checks a meta write against the limits.
func (m *Meta) Validate() error {
	if len(m.Owners) > MaxOwners {
		return invalid("owners: at most %d", MaxOwners)
	}
	for _, o := range m.Owners {
		if !ident.OpenID(o) {
			return invalid("owners: %q is not a valid openid", clip(o))
		}
	}
	if m.Region != "" && !ident.Valid(m.Region, MaxRegion) {
		return invalid("region must match [A-Za-z0-9._-]{1,%d}", MaxRegion)
	}
	if len(m.Tags) > MaxTags {
		return invalid("tags: at most %d", MaxTags)
	}
	for k, v := range m.Tags {
		if !ident.Valid(k, MaxTagKey) || len(v) > MaxTagValue {
			return invalid("tags: key %q must match [A-Za-z0-9._-]{1,%d} and values be at most %d bytes", clip(k), MaxTagKey, MaxTagValue)
		}
	}
	return nil
}

// Normalize puts a meta write in the form both sides store: owners sorted.
func (m *Meta) Normalize() { sort.Strings(m.Owners) }

// ValidateState checks a client's or a device's state object (field name to
// JSON value; null deletes): at least one and at most MaxStateFields fields,
// names of 1 to MaxFieldName bytes, values of at most MaxValueBytes
// (ErrTooLarge) that follow the JSON rules (CheckValue).
func ValidateState(state map[string]json.RawMessage) error {
	if len(state) == 0 {
		return invalid("state must have at least one field")
	}
	if len(state) > MaxStateFields {
		return invalid("state has %d fields, at most %d allowed", len(state), MaxStateFields)
	}
	for k, v := range state {
		if err := validFieldName(k); err != nil {
			return err
		}
		if len(v) > MaxValueBytes {
			return tooLarge("state field %q is %d bytes, at most %d allowed", clip(k), len(v), MaxValueBytes)
		}
		if err := valueErr(k, v); err != nil {
			return err
		}
	}
	return nil
}

// valueErr is the refusal of state field k's value v, or nil.
func valueErr(k string, v []byte) error {
	err := CheckValue(v)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, ErrJSONSyntax):
		return invalid("state field %q is not valid JSON: %v", clip(k), err)
	}
	return invalid("state field %q: %v", clip(k), err)
}

func validFieldName(k string) error {
	if k == "" || len(k) > MaxFieldName {
		return invalid("state field name %q must be 1 to %d bytes", clip(k), MaxFieldName)
	}
	return nil
}

// clip shortens a client-supplied string quoted in a message.
func clip(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}

// ScrubDoc returns d with every value that breaks the JSON rules
// (CheckValue) replaced by null, and how many were; d itself, not a copy,
// when none is. The edge's syncer applies it to the state it pushes and
// pulls, so a value stored before these rules existed neither stalls a sync
// stream (the cloud refuses a batch holding it) nor reaches a phone.
func ScrubDoc(d shadow.Doc) (shadow.Doc, int) {
	n := 0
	for _, f := range d {
		if !f.Deleted && CheckValue(f.Value) != nil {
			n++
		}
	}
	if n == 0 {
		return d, 0
	}
	out := make(shadow.Doc, len(d))
	for k, f := range d {
		if !f.Deleted && CheckValue(f.Value) != nil {
			f.Value = json.RawMessage("null")
		}
		out[k] = f
	}
	return out, n
}
