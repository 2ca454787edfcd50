package rules

import (
	"encoding/binary"
	"strconv"
	"strings"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/lww"
)

// Alert states, in the only order an alert moves through them.
const (
	StateActive       = "active"
	StateAcknowledged = "acknowledged"
	StateCleared      = "cleared"
)

// rank orders the states: a merge never moves an alert back.
func rank(state string) int {
	switch state {
	case StateActive:
		return 1
	case StateAcknowledged:
		return 2
	case StateCleared:
		return 3
	}
	return 0
}

// Alert is one firing of a rule for a device. The edge that raised it and
// the cloud both hold a copy, and either may change it (an ack at the cloud,
// a clear at the edge); Merge makes the copies converge.
type Alert struct {
	ID        string  `json:"id"`
	Rule      string  `json:"rule"`
	Device    string  `json:"device"`
	Severity  string  `json:"severity"`
	State     string  `json:"state"`
	Message   string  `json:"message,omitempty"`
	Value     float64 `json:"value"`
	StartedAt int64   `json:"started_at"`
	AckedAt   int64   `json:"acked_at,omitempty"`
	AckedBy   string  `json:"acked_by,omitempty"`
	ClearedAt int64   `json:"cleared_at,omitempty"`
	// AckStamp and ClearStamp stamp the two transitions a replica can make
	// after firing; Stamp is the later of the three.
	AckStamp   hlc.Timestamp `json:"ack_stamp,omitzero"`
	ClearStamp hlc.Timestamp `json:"clear_stamp,omitzero"`
	Stamp      hlc.Timestamp `json:"stamp"`
}

// AlertID is the id of the alert rule raised for device at startedMs. '~'
// is outside the id charset of rules and devices, so the id splits
// unambiguously, and it is unreserved in URLs.
func AlertID(rule, device string, startedMs int64) string {
	return device + "~" + rule + "~" + strconv.FormatInt(startedMs, 10)
}

// ParseAlertID splits an alert id.
func ParseAlertID(id string) (device, rule string, startedMs int64, ok bool) {
	parts := strings.Split(id, "~")
	if len(parts) != 3 {
		return "", "", 0, false
	}
	ms, err := strconv.ParseInt(parts[2], 10, 64)
	if err != nil {
		return "", "", 0, false
	}
	return parts[0], parts[1], ms, true
}

// Open reports whether the alert still waits for its clear condition.
func (a *Alert) Open() bool { return a.State == StateActive || a.State == StateAcknowledged }

// Merge folds other, another copy of the same alert, into a and reports
// whether a changed. The state is the further of the two (plain
// last-writer-wins could move a cleared alert back to acknowledged when an
// ack made offline arrives after the clear); the ack and the clear each keep
// the version with the winning stamp (pkg/lww), so an ack made at the edge
// and one made at the cloud settle on one acker everywhere. Merge is
// commutative, associative and idempotent: copies merged in any order end
// equal.
func (a *Alert) Merge(other Alert) bool {
	before := *a
	if other.AckStamp != 0 && lww.Wins(ackOf(other), ackOf(*a)) {
		a.AckedAt, a.AckedBy, a.AckStamp = other.AckedAt, other.AckedBy, other.AckStamp
	}
	if other.ClearStamp != 0 && lww.Wins(clearOf(other), clearOf(*a)) {
		a.ClearedAt, a.ClearStamp = other.ClearedAt, other.ClearStamp
	}
	a.State = StateActive
	if a.AckStamp != 0 {
		a.State = StateAcknowledged
	}
	if a.ClearStamp != 0 {
		a.State = StateCleared
	}
	if rank(other.State) > rank(a.State) {
		a.State = other.State // a state without its stamp: from an old writer
	}
	a.Stamp = max(a.Stamp, other.Stamp, a.AckStamp, a.ClearStamp)
	return *a != before
}

// ackOf and clearOf are the two transitions as lww records.
type transition struct {
	stamp hlc.Timestamp
	at    int64
	by    string
}

func (t transition) LWWStamp() hlc.Timestamp { return t.stamp }
func (t transition) AppendCanonical(b []byte) []byte {
	b = binary.AppendVarint(b, t.at)
	return lww.AppendString(b, t.by)
}

func ackOf(a Alert) transition   { return transition{a.AckStamp, a.AckedAt, a.AckedBy} }
func clearOf(a Alert) transition { return transition{a.ClearStamp, a.ClearedAt, ""} }
