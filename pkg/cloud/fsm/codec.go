package fsm

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"sort"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// CmdType says what a command does.
type CmdType byte

// Command types. Values are persisted in the raft log: never renumber.
const (
	CmdPush       CmdType = 1 // an edge's push batch
	CmdDesired    CmdType = 2 // a consumer's desired-state write
	CmdHeartbeat  CmdType = 3
	CmdNodeUpsert CmdType = 4
	CmdNodeRemove CmdType = 5
	CmdUserPut    CmdType = 6
	CmdMeta       CmdType = 7 // a consumer's device meta write
	CmdState      CmdType = 8 // an edge's unsequenced state changes (state before history)
	CmdPolicyPut  CmdType = 9 // a policy module for edges; empty Rego deletes it
	CmdSigningKey CmdType = 10
	// Users' sessions (refresh-token families); see sessions.go.
	CmdSessionCreate     CmdType = 11
	CmdSessionRotate     CmdType = 12
	CmdSessionRevokeUser CmdType = 13
	CmdSessionPurge      CmdType = 14
	// CmdPullAcks records the pull positions edges acknowledged, which
	// deletes the downlink entries behind them (downlink.go).
	CmdPullAcks CmdType = 17
	// Bounded state: readings retention, log compaction, tombstone purge
	// (compact.go).
	CmdCompact CmdType = 15
)

// SigningKey is the deployment's token signing key, generated once by a
// leader and replicated so that every node signs with the same key and every
// edge needs to trust only one kid.
type SigningKey struct {
	KID  string `json:"kid"`
	Seed []byte `json:"seed"`
}

const entryVersion = 1

// Node is a cluster member's addresses, kept in the state machine so that
// every node can forward to the leader's HTTP address.
type Node struct {
	ID       string `json:"id"`
	RaftAddr string `json:"raft_addr"`
	HTTPAddr string `json:"http_addr"`
}

// Command is one state change proposed through raft. AtMs is the leader's
// wall clock when it proposed the command: Apply never reads the clock, so
// every replica computes the same state.
type Command struct {
	Type      CmdType
	AtMs      int64
	Push      *wire.PushBatch
	Change    *wire.Change // CmdDesired, CmdMeta
	Heartbeat *wire.Heartbeat
	Node      *Node  // CmdNodeUpsert
	NodeID    string // CmdNodeRemove
	User      *wire.User
	State     *wire.StateBatch // CmdState
	Policy    *wire.Policy     // CmdPolicyPut
	Key       *SigningKey      // CmdSigningKey
	Session   *SessionCmd      // CmdSession*
	PullAcks  *PullAcks        // CmdPullAcks
	Compact   *CompactCmd      // CmdCompact
	Sink      *SinkCursorCmd   // CmdSinkCursor
	Rule      *RuleCmd         // CmdRulePut
	Alerts    *AlertsCmd       // CmdAlerts
	Notify    *NotifyDoneCmd   // CmdNotifyDone
	// Refusals marks changes of a push or state batch that the leader
	// refused under edge restriction (see restrict.go); they are applied as
	// corrections, not as the edge sent them.
	Refusals []Refusal
	// Digests is the content digest of each change of a push, as the edge
	// sent it (before the stamp policy edited it): the sequence record that
	// tells an idempotent re-send from sequence squatting.
	Digests []wire.Digest
}

// Refusal is one refused change of a batch: its position, why, and the
// stamp the correction that returns the edge's copy to the cloud's value
// carries (newer than the refused change, from the leader's clock).
type Refusal struct {
	Index   int           `json:"-"`
	Reason  string        `json:"reason"`
	Correct hlc.Timestamp `json:"correct"`
}

// ErrCorrupt means a log entry could not be decoded.
var ErrCorrupt = errors.New("fsm: corrupt command")

// EncodeCommand serialises c. Push batches use a compact binary layout
// (they are the bulk of the log); everything else is JSON.
func EncodeCommand(c *Command) ([]byte, error) {
	size := 256
	if c.Type == CmdPush && c.Push != nil {
		// A push is mostly readings, about 40 bytes each: one allocation
		// instead of a doubling per few kilobytes.
		for i := range c.Push.Changes {
			size += 32 + 48*len(c.Push.Changes[i].Readings)
		}
		size += len(c.Digests) * wire.DigestSize
	}
	b := make([]byte, 0, size)
	b = append(b, byte(c.Type))
	b = binary.AppendVarint(b, c.AtMs)
	switch c.Type {
	case CmdPush:
		p := c.Push
		b = appendString(b, p.Edge)
		b = binary.AppendUvarint(b, p.FirstSeq)
		b, err := appendChanges(b, p.Changes, c.Refusals)
		if err != nil || len(c.Digests) == 0 {
			return b, err
		}
		// Digests follow the changes; an entry written before they existed
		// ends after the changes.
		b = binary.AppendUvarint(b, uint64(len(c.Digests)))
		for _, d := range c.Digests {
			b = append(b, d[:]...)
		}
		return b, nil
	case CmdDesired, CmdMeta:
		return appendChange(b, c.Change)
	case CmdHeartbeat:
		return appendJSON(b, c.Heartbeat)
	case CmdNodeUpsert:
		return appendJSON(b, c.Node)
	case CmdNodeRemove:
		return appendString(b, c.NodeID), nil
	case CmdUserPut:
		return appendJSON(b, c.User)
	case CmdState:
		b = appendString(b, c.State.Edge)
		return appendChanges(b, c.State.Changes, c.Refusals)
	case CmdPolicyPut:
		return appendJSON(b, c.Policy)
	case CmdSigningKey:
		return appendJSON(b, c.Key)
	case CmdSessionCreate, CmdSessionRotate, CmdSessionRevokeUser, CmdSessionPurge:
		return appendJSON(b, c.Session)
	case CmdPullAcks:
		return appendJSON(b, c.PullAcks)
	case CmdCompact:
		return appendJSON(b, c.Compact)
	case CmdSinkCursor:
		return appendJSON(b, c.Sink)
	case CmdRulePut:
		return appendJSON(b, c.Rule)
	case CmdAlerts:
		return appendJSON(b, c.Alerts)
	case CmdNotifyDone:
		return appendJSON(b, c.Notify)
	}
	return nil, fmt.Errorf("fsm: unknown command type %d", c.Type)
}

// EncodeEntry frames already-encoded commands as one raft log entry: the
// unit of group commit.
func EncodeEntry(cmds [][]byte) []byte {
	n := 1 + binary.MaxVarintLen64
	for _, c := range cmds {
		n += len(c) + binary.MaxVarintLen64
	}
	b := make([]byte, 0, n)
	b = append(b, entryVersion)
	b = binary.AppendUvarint(b, uint64(len(cmds)))
	for _, c := range cmds {
		b = binary.AppendUvarint(b, uint64(len(c)))
		b = append(b, c...)
	}
	return b
}

func splitEntry(data []byte) ([][]byte, error) {
	r := reader{b: data}
	if v := r.byte(); v != entryVersion {
		return nil, fmt.Errorf("%w: entry version %d", ErrCorrupt, v)
	}
	n := r.uvarint()
	if r.err != nil || n > uint64(len(data)) {
		return nil, fmt.Errorf("%w: entry header", ErrCorrupt)
	}
	out := make([][]byte, 0, n)
	for i := uint64(0); i < n; i++ {
		out = append(out, r.bytes())
	}
	return out, r.err
}

// rawReading is a reading as decoded from a command: metrics stay in their
// encoded form, which is also the stored value, so applying a reading costs
// no re-encoding.
type rawReading struct {
	TS      int64
	ID      string
	Metrics []byte
}

// rawChange is a decoded change; readings stay raw.
type rawChange struct {
	Kind     string
	Device   string
	Readings []rawReading
	Other    *wire.Change   // non-readings kinds
	Refused  *refusedChange // a change refused under edge restriction
}

type decodedCmd struct {
	Type     CmdType
	AtMs     int64
	Edge     string
	FirstSeq uint64
	Changes  []rawChange
	Digests  []wire.Digest // CmdPush, when the entry carries them
	Cmd      Command       // non-push payloads
}

func decodeCommand(data []byte) (*decodedCmd, error) {
	r := reader{b: data}
	d := &decodedCmd{Type: CmdType(r.byte()), AtMs: r.varint()}
	var err error
	d.Cmd.Type, d.Cmd.AtMs = d.Type, d.AtMs
	switch d.Type {
	case CmdPush:
		d.Edge = r.string()
		d.FirstSeq = r.uvarint()
		r.shareIDs(data)
		if d.Changes, err = r.changes(len(data)); err != nil {
			return nil, err
		}
		if r.err == nil && len(r.b) > 0 {
			n := r.uvarint()
			if n != uint64(len(d.Changes)) || n*wire.DigestSize != uint64(len(r.b)) {
				return nil, fmt.Errorf("%w: push digests", ErrCorrupt)
			}
			d.Digests = make([]wire.Digest, n)
			for i := range d.Digests {
				copy(d.Digests[i][:], r.b[i*wire.DigestSize:])
			}
			r.b = nil
		}
	case CmdDesired, CmdMeta:
		c := r.change()
		if r.err == nil && c.Other == nil {
			// A readings change: the encoder never writes one here, and
			// the applier needs a payload.
			return nil, fmt.Errorf("%w: readings in a %d command", ErrCorrupt, d.Type)
		}
		d.Cmd.Change = c.Other
	case CmdHeartbeat:
		d.Cmd.Heartbeat = &wire.Heartbeat{}
		r.json(d.Cmd.Heartbeat)
	case CmdNodeUpsert:
		d.Cmd.Node = &Node{}
		r.json(d.Cmd.Node)
	case CmdNodeRemove:
		d.Cmd.NodeID = r.string()
	case CmdUserPut:
		d.Cmd.User = &wire.User{}
		r.json(d.Cmd.User)
	case CmdState:
		d.Edge = r.string()
		if d.Changes, err = r.changes(len(data)); err != nil {
			return nil, err
		}
	case CmdPolicyPut:
		d.Cmd.Policy = &wire.Policy{}
		r.json(d.Cmd.Policy)
	case CmdSigningKey:
		d.Cmd.Key = &SigningKey{}
		r.json(d.Cmd.Key)
	case CmdSessionCreate, CmdSessionRotate, CmdSessionRevokeUser, CmdSessionPurge:
		d.Cmd.Session = &SessionCmd{}
		r.json(d.Cmd.Session)
	case CmdPullAcks:
		d.Cmd.PullAcks = &PullAcks{}
		r.json(d.Cmd.PullAcks)
	case CmdCompact:
		d.Cmd.Compact = &CompactCmd{}
		r.json(d.Cmd.Compact)
	case CmdSinkCursor:
		d.Cmd.Sink = &SinkCursorCmd{}
		r.json(d.Cmd.Sink)
	case CmdRulePut:
		d.Cmd.Rule = &RuleCmd{}
		r.json(d.Cmd.Rule)
	case CmdAlerts:
		d.Cmd.Alerts = &AlertsCmd{}
		r.json(d.Cmd.Alerts)
	case CmdNotifyDone:
		d.Cmd.Notify = &NotifyDoneCmd{}
		r.json(d.Cmd.Notify)
	default:
		return nil, fmt.Errorf("%w: unknown command type %d", ErrCorrupt, d.Type)
	}
	if r.err != nil {
		return nil, r.err
	}
	return d, nil
}

// appendChanges writes a change count and the changes (push and state
// batches); a refused change is written as its refusal.
func appendChanges(b []byte, cs []wire.Change, refused []Refusal) ([]byte, error) {
	b = binary.AppendUvarint(b, uint64(len(cs)))
	r := 0
	for i := range cs {
		var err error
		if r < len(refused) && refused[r].Index == i {
			b, err = appendRefused(b, &cs[i], refused[r])
			r++
		} else {
			b, err = appendChange(b, &cs[i])
		}
		if err != nil {
			return nil, err
		}
	}
	return b, nil
}

const (
	kindReadings byte = 1
	kindOther    byte = 2
	kindRefused  byte = 3
)

// refusedChange is what a refused change keeps in the log: enough to build
// its correction (the device or user, and the desired fields it named), and
// the reason; never the refused values.
type refusedChange struct {
	Kind    string        `json:"kind"`
	Device  string        `json:"device,omitempty"`
	OpenID  string        `json:"openid,omitempty"`
	Fields  []string      `json:"fields,omitempty"`
	Reason  string        `json:"reason"`
	Correct hlc.Timestamp `json:"correct"`
}

func appendRefused(b []byte, c *wire.Change, r Refusal) ([]byte, error) {
	rc := refusedChange{Kind: c.Kind, Device: c.Device, Reason: r.Reason, Correct: r.Correct}
	if c.User != nil {
		rc.OpenID = c.User.OpenID
	}
	for k := range c.Doc {
		rc.Fields = append(rc.Fields, k)
	}
	sort.Strings(rc.Fields)
	b = append(b, kindRefused)
	return appendJSON(b, rc)
}

func appendChange(b []byte, c *wire.Change) ([]byte, error) {
	if c.Kind != wire.KindReadings {
		b = append(b, kindOther)
		return appendJSON(b, c)
	}
	b = append(b, kindReadings)
	b = appendString(b, c.Device)
	b = binary.AppendUvarint(b, uint64(len(c.Readings)))
	var buf []wire.Metric
	for i := range c.Readings {
		rd := &c.Readings[i]
		b = binary.AppendVarint(b, rd.TS)
		b = appendString(b, rd.ID)
		ms := rd.SortedMetrics(&buf)
		b = appendMetrics(b, ms)
	}
	return b, nil
}

// appendMetrics writes metrics, sorted by name (wire.Reading.SortedMetrics)
// so that every replica stores identical bytes, as one length-prefixed
// value: the count, then each name and its IEEE-754 bits.
func appendMetrics(b []byte, ms []wire.Metric) []byte {
	size := uvarintLen(uint64(len(ms)))
	for _, m := range ms {
		size += uvarintLen(uint64(len(m.Name))) + len(m.Name) + 8
	}
	b = binary.AppendUvarint(b, uint64(size))
	b = binary.AppendUvarint(b, uint64(len(ms)))
	for _, m := range ms {
		b = appendString(b, m.Name)
		b = binary.LittleEndian.AppendUint64(b, math.Float64bits(m.Value))
	}
	return b
}

func uvarintLen(v uint64) int {
	n := 1
	for v >= 0x80 {
		v >>= 7
		n++
	}
	return n
}

// DecodeMetrics reads a stored metrics value.
func DecodeMetrics(v []byte) (map[string]float64, error) {
	r := reader{b: v}
	n := r.uvarint()
	if n > uint64(len(v)) {
		return nil, fmt.Errorf("%w: metric count", ErrCorrupt)
	}
	m := make(map[string]float64, n)
	for i := uint64(0); i < n && r.err == nil; i++ {
		k := r.string()
		m[k] = math.Float64frombits(r.uint64le())
	}
	return m, r.err
}

// validMetrics reports whether v is exactly one metrics value as
// appendMetrics writes it, without decoding it.
func validMetrics(v []byte) bool {
	r := reader{b: v}
	n := r.uvarint()
	if n > uint64(len(v)) {
		return false
	}
	for i := uint64(0); i < n && r.err == nil; i++ {
		r.bytes()
		r.uint64le()
	}
	return r.err == nil && len(r.b) == 0
}

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendJSON(b []byte, v any) ([]byte, error) {
	j, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("fsm: encode command: %w", err)
	}
	b = binary.AppendUvarint(b, uint64(len(j)))
	return append(b, j...), nil
}

// reader decodes the binary layout, remembering the first error so call
// sites stay linear.
type reader struct {
	b   []byte
	err error

	// src is a copy of the whole input, of which b is a suffix, when
	// reading ids are substrings of it (shareIDs).
	src string
}

// shareIDs makes the readings' ids that follow substrings of one copy of
// data instead of a string each: a push's readings all have ids, and
// nothing keeps them past the apply (keys and the log copy them).
func (r *reader) shareIDs(data []byte) { r.src = string(data) }

// id reads a reading's id.
func (r *reader) id() string {
	b := r.bytes()
	if r.src == "" || r.err != nil {
		return string(b)
	}
	end := len(r.src) - len(r.b)
	return r.src[end-len(b) : end]
}

func (r *reader) fail() {
	if r.err == nil {
		r.err = ErrCorrupt
	}
	r.b = nil
}

func (r *reader) byte() byte {
	if len(r.b) < 1 {
		r.fail()
		return 0
	}
	v := r.b[0]
	r.b = r.b[1:]
	return v
}

func (r *reader) uvarint() uint64 {
	v, n := binary.Uvarint(r.b)
	if n <= 0 {
		r.fail()
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *reader) varint() int64 {
	v, n := binary.Varint(r.b)
	if n <= 0 {
		r.fail()
		return 0
	}
	r.b = r.b[n:]
	return v
}

func (r *reader) uint64le() uint64 {
	if len(r.b) < 8 {
		r.fail()
		return 0
	}
	v := binary.LittleEndian.Uint64(r.b)
	r.b = r.b[8:]
	return v
}

func (r *reader) bytes() []byte {
	n := r.uvarint()
	if n > uint64(len(r.b)) {
		r.fail()
		return nil
	}
	v := r.b[:n:n]
	r.b = r.b[n:]
	return v
}

func (r *reader) string() string { return string(r.bytes()) }

func (r *reader) json(v any) {
	b := r.bytes()
	if r.err != nil {
		return
	}
	if err := json.Unmarshal(b, v); err != nil {
		r.err = fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
}

// changes reads what appendChanges wrote; size bounds the count (the whole
// command's length).
func (r *reader) changes(size int) ([]rawChange, error) {
	n := r.uvarint()
	if n > uint64(size) {
		return nil, fmt.Errorf("%w: change count", ErrCorrupt)
	}
	out := make([]rawChange, 0, n)
	for i := uint64(0); i < n && r.err == nil; i++ {
		out = append(out, r.change())
	}
	return out, nil
}

func (r *reader) change() rawChange {
	switch r.byte() {
	case kindReadings:
		c := rawChange{Kind: wire.KindReadings, Device: r.string()}
		n := r.uvarint()
		if n > uint64(len(r.b)) {
			r.fail()
			return c
		}
		c.Readings = make([]rawReading, 0, n)
		for i := uint64(0); i < n && r.err == nil; i++ {
			rd := rawReading{TS: r.varint(), ID: r.id(), Metrics: r.bytes()}
			if r.err == nil && !validMetrics(rd.Metrics) {
				// Stored as is, so check now: a query must be able to
				// decode what Apply stored.
				r.fail()
			}
			c.Readings = append(c.Readings, rd)
		}
		return c
	case kindOther:
		var w wire.Change
		r.json(&w)
		if r.err == nil && w.Kind == wire.KindReadings {
			r.fail() // the encoder writes readings in binary only
		}
		return rawChange{Kind: w.Kind, Device: w.Device, Other: &w}
	case kindRefused:
		var rc refusedChange
		r.json(&rc)
		return rawChange{Kind: rc.Kind, Device: rc.Device, Refused: &rc}
	}
	r.fail()
	return rawChange{}
}

// appendRawChange re-encodes a decoded change (used for the export log,
// which holds only what actually changed).
func appendRawChange(b []byte, c *rawChange) ([]byte, error) {
	if c.Kind != wire.KindReadings {
		b = append(b, kindOther)
		return appendJSON(b, c.Other)
	}
	b = append(b, kindReadings)
	b = appendString(b, c.Device)
	b = binary.AppendUvarint(b, uint64(len(c.Readings)))
	for _, rd := range c.Readings {
		b = binary.AppendVarint(b, rd.TS)
		b = appendString(b, rd.ID)
		b = binary.AppendUvarint(b, uint64(len(rd.Metrics)))
		b = append(b, rd.Metrics...)
	}
	return b, nil
}
