// Package wire defines the edge↔cloud sync protocol spoken on /sync/v1/: the
// JSON shapes of push batches, pull pages and heartbeats, their validation,
// and the HTTP conventions (paths, headers, content encodings) both sides
// rely on. It is pure — it imports only hlc, ident, lww, shadow and the standard library —
// so the edge's syncer and the cloud's handlers share one definition and
// neither depends on the other's internals.
//
// Protocol in brief:
//
//   - Every change an edge makes is numbered by its outbox sequence. A push
//     carries a contiguous run of changes starting at FirstSeq. The cloud
//     applies each sequence number exactly once: a re-sent batch (or the
//     already-applied prefix of an overlapping one) is acknowledged without
//     effect, and a batch that starts beyond the next expected number is
//     refused with 409 and the expected number in the message and in the
//     X-Outpost-Expected-Seq header, so the edge can rewind its cursor. A
//     re-send starts after a sequence the cloud acknowledged, and is a
//     duplicate only if its content is what was applied (Change.Digest);
//     otherwise it is refused with 422 (sequence squatting).
//   - Edge restriction: desired, meta and user changes carry their Actor and
//     Proof (the user's access token); the cloud refuses what it cannot
//     verify and re-authorise, counts it in the result (Refused), and sends
//     the edge its own value back through pull.
//   - Bodies may be compressed (Content-Encoding: zstd or gzip); zstd is what
//     the Go client sends.
//   - A push is written and read by the push codec (push.go):
//     AppendPushBatch writes the JSON encoding/json would, and
//     DecodePushBatch reads the shape an edge sends into Reading.Sorted
//     (metrics sorted by name), leaving anything else to a general
//     decoder, so the bytes on the network and every answer to them are
//     what they were.
//   - Pull returns cloud-side changes for the edge (desired state written in
//     the cloud, users and roles) after an opaque cursor, and the cursor to
//     resume from. Re-pulling from an old cursor is always safe because every
//     change is a last-writer-wins shadow delta.
//   - Heartbeat publishes the edge's place in the directory and returns the
//     cloud's acknowledged sequence for the edge, which is where a restarted
//     syncer resumes.
//   - State before history: device state (reported, desired, meta) and users
//     are also sent ahead of the sequenced stream through POST /sync/v1/state,
//     unsequenced. That is sound because every state change is a
//     last-writer-wins delta: applying it early, late or twice gives the same
//     state, so its later arrival in the sequenced push is a no-op. Only
//     readings need the sequence for exactly-once.
//   - A pull page also carries the deployment's current public signing keys,
//     policies and edge directory, so an edge can verify tokens, authorise
//     and find neighbours while offline. An edge that says which versions
//     of those sets it holds (QueryHave, sets.go) gets a set only when its
//     version moved, and the directory as a delta; an older edge that says
//     nothing gets them whole in every page.
//   - Pulls long-poll: an edge may ask the cloud to hold an empty pull
//     (QueryWait) until something is there for it or the wait ends, so a
//     cloud-side write reaches it at once without polling.
//   - Alerts an edge's rules raised, and their acks and clears, go to
//     POST /sync/v1/alerts (AlertBatch), unsequenced: copies of an alert
//     merge as a semilattice. An ack made at the cloud comes back to the
//     edge that raised the alert as a KindAlert change in its pull.
//     Distributed rules are a versioned set in the pull, chosen by the
//     edge's region.
//   - Liveness is soft state: heartbeats are kept in the memory of the
//     cloud leader and never written to the replicated log unless a
//     durable fact (region, location, advertise URL) changed; a pull the
//     leader holds counts as liveness too.
//
// It also holds the one encoding of the desired-state downlink an edge
// publishes to its devices over MQTT (downlink.go), which the API and the
// syncer both send.
//
// Besides the protocol, wire holds the rules the edge's and the cloud's
// consumer APIs must apply identically: the limits on device meta and state
// (limits.go), the parsing of query parameters (query.go), the nearest-edge
// ranking and its item (directory.go) and the response envelope. Both HTTP
// servers call them; pkg/httpenv maps their sentinel errors to statuses.
package wire

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/ident"
	"github.com/outpost-edge/outpost/pkg/lww"
	"github.com/outpost-edge/outpost/pkg/shadow"
)

// HTTP paths of the sync API, relative to a cloud node's base URL.
const (
	PathPush      = "/sync/v1/push"
	PathPull      = "/sync/v1/pull"
	PathHeartbeat = "/sync/v1/heartbeat"
	PathState     = "/sync/v1/state"
	// PathAlerts takes the alerts an edge raised or changed (AlertBatch).
	PathAlerts = "/sync/v1/alerts"
	// PathLogin is the cloud's user login (code2session), which a joined
	// edge forwards logins to; PathRefresh likewise for refresh tokens.
	PathLogin   = "/api/v1/auth/login"
	PathRefresh = "/api/v1/auth/refresh"
)

// Messages of the refresh endpoint's 401 answers. They are part of the
// client contract, and a joined edge maps the cloud's answer back to its
// own errors by them.
const (
	MsgRefreshReused  = "refresh token was already used: the session is revoked, log in again"
	MsgRefreshRevoked = "refresh token revoked: log in again"
	MsgRefreshExpired = "refresh token expired: log in again"
	MsgRefreshUnknown = "unknown refresh token: log in again"
)

// Headers with protocol meaning.
const (
	// HeaderExpectedSeq carries, on a 409 push response, the sequence number
	// the cloud expects next from this edge.
	HeaderExpectedSeq = "X-Outpost-Expected-Seq"
	// HeaderLeader is set by a follower on an answer it forwarded from the
	// leader: the leader's base URL (scheme://host:port as the leader
	// advertises it). A client whose node list holds that URL sends there
	// next, sparing every later request the hop; a URL it does not hold
	// (a load balancer in front of the nodes) it ignores.
	HeaderLeader = "X-Outpost-Leader"
	// HeaderRetryAfter is the standard Retry-After (seconds) sent with 429
	// and 503.
	HeaderRetryAfter = "Retry-After"
)

// Content encodings accepted on request bodies.
const (
	EncodingZstd = "zstd"
	EncodingGzip = "gzip"
)

// Limits the cloud enforces; an edge's syncer should cut batches below them.
const (
	MaxBatchChanges  = 20000
	MaxReadingsTotal = 100000
	MaxBodyBytes     = 64 << 20 // decompressed
	MaxMetrics       = 256
)

// Change kinds.
const (
	KindReadings = "readings"
	KindReported = "reported"
	KindDesired  = "desired"
	KindMeta     = "meta"
	KindUser     = "user" // cloud → edge only
	// KindSessions carries a session revocation (cloud → edge only), so
	// that an edge refusing refresh tokens offline knows which sessions the
	// cloud ended.
	KindSessions = "sessions"
	// KindAlert carries an alert changed at the cloud (an ack) to the edge
	// that raised it (cloud → edge only; edges send alerts on PathAlerts).
	KindAlert = "alert"
)

// Reading is one telemetry sample as it travels on the wire: Unix
// milliseconds, an optional message id (the dedup key when present) and
// numeric metrics.
//
// The metrics are in Metrics or in Sorted, never both. Sorted is the push
// codec's form (push.go): sorted by name, no name twice, which Validate
// checks. JSON marshalling knows only Metrics; a push is written with
// AppendPushBatch, which knows both.
type Reading struct {
	TS      int64              `json:"ts"`
	ID      string             `json:"id,omitempty"`
	Metrics map[string]float64 `json:"metrics"`
	Sorted  []Metric           `json:"-"`
}

// Meta is a device's placement and ownership, set by an admin. Stamp orders
// concurrent writes (last writer wins as a whole record, see pkg/lww); zero
// sorts first. The edge's store keeps the same fields (store.DeviceMeta
// converts to Meta), so both sides compare one encoding.
type Meta struct {
	Owners []string      `json:"owners,omitempty"`
	Region string        `json:"region,omitempty"`
	Tags   Tags          `json:"tags,omitempty"`
	Stamp  hlc.Timestamp `json:"stamp,omitzero"`
}

// LWWStamp implements lww.Record.
func (m Meta) LWWStamp() hlc.Timestamp { return m.Stamp }

// AppendCanonical implements lww.Record: region, owners in their order,
// tags by key.
func (m Meta) AppendCanonical(b []byte) []byte {
	b = lww.AppendString(b, m.Region)
	b = lww.AppendStrings(b, m.Owners)
	return lww.AppendStringMap(b, m.Tags)
}

// Tags is a device's tags: key to value. It travels as a JSON object; the
// list of "key=value" strings older edges sent (and older cloud state holds)
// is still accepted when decoding.
type Tags map[string]string

// UnmarshalJSON accepts an object or a "key=value" list.
func (t *Tags) UnmarshalJSON(b []byte) error {
	var m map[string]string
	if err := json.Unmarshal(b, &m); err == nil {
		*t = m
		return nil
	}
	var l []string
	if err := json.Unmarshal(b, &l); err != nil {
		return fmt.Errorf("tags: want an object of strings or a list of \"key=value\" strings: %w", err)
	}
	m = make(map[string]string, len(l))
	for _, kv := range l {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	*t = m
	return nil
}

// User is a user's roles and regions, written at the cloud or at any edge and
// distributed to every edge; Stamp orders concurrent writes. The edge's
// store.User has the same fields and converts to User for comparison.
type User struct {
	OpenID  string        `json:"openid"`
	Roles   []string      `json:"roles"`
	Regions []string      `json:"regions,omitempty"`
	Stamp   hlc.Timestamp `json:"stamp,omitzero"`
}

// LWWStamp implements lww.Record.
func (u User) LWWStamp() hlc.Timestamp { return u.Stamp }

// AppendCanonical implements lww.Record.
func (u User) AppendCanonical(b []byte) []byte {
	b = lww.AppendString(b, u.OpenID)
	b = lww.AppendStrings(b, u.Roles)
	return lww.AppendStrings(b, u.Regions)
}

// Change is one entry of an edge's outbox (or of a pull page). Exactly one
// payload field matching Kind is set.
type Change struct {
	Kind     string     `json:"kind"`
	Device   string     `json:"device,omitempty"`
	Readings []Reading  `json:"readings,omitempty"`
	Doc      shadow.Doc `json:"doc,omitempty"` // reported or desired delta
	Meta     *Meta      `json:"meta,omitempty"`
	User     *User      `json:"user,omitempty"`
	Sessions *Sessions  `json:"sessions,omitempty"`
	// Alert is a KindAlert change's alert, a pkg/rules Alert's JSON.
	Alert json.RawMessage `json:"alert,omitempty"`
	// Actor is the openid of the user who made a desired, meta or user
	// change at the edge, and Proof the access token that user presented
	// there. The cloud accepts those kinds from an edge only with a proof
	// it can verify and re-authorise (docs/security.md, "Edge
	// restriction"); both are empty on readings and reported state, which
	// are the edge's own observations, and on pulled changes.
	Actor string `json:"actor,omitempty"`
	Proof string `json:"proof,omitempty"`
}

// MaxProofBytes bounds a change's proof (an access token).
const MaxProofBytes = 4096

// Sessions is a revocation of users' sessions, distributed to every edge:
// the refresh-token families named in Families are ended, and so is every
// session of OpenID (when set) whose tokens were issued before BeforeMs.
// Nothing it names can outlive UntilMs (the newest affected token's expiry),
// after which an edge may forget it.
type Sessions struct {
	OpenID   string   `json:"openid,omitempty"`
	Families []string `json:"families,omitempty"`
	BeforeMs int64    `json:"before_ms,omitempty"`
	UntilMs  int64    `json:"until_ms"`
}

// PushBatch is the body of POST /sync/v1/push: changes numbered FirstSeq,
// FirstSeq+1, … in order.
type PushBatch struct {
	Edge     string   `json:"edge"`
	FirstSeq uint64   `json:"first_seq"`
	Changes  []Change `json:"changes"`
}

// LastSeq is the sequence number of the batch's last change.
func (b *PushBatch) LastSeq() uint64 { return b.FirstSeq + uint64(len(b.Changes)) - 1 }

// PushResult is the data of a successful push.
type PushResult struct {
	// AckedSeq is the highest sequence of this edge the cloud has committed;
	// the edge may truncate its outbox up to it.
	AckedSeq uint64 `json:"acked_seq"`
	// Applied counts changes of this batch applied now (not already seen).
	Applied int `json:"applied"`
	// Duplicates counts readings dropped because the cloud already had them.
	Duplicates int `json:"duplicates"`
	// Index is the raft index that committed the batch.
	Index uint64 `json:"index"`
	// RejectedStamps counts state fields dropped because their HLC stamp was
	// further ahead of the cloud's clock than the maximum drift; the rest of
	// the batch (readings included) is committed, so a fast clock cannot
	// stall the stream.
	RejectedStamps int `json:"rejected_stamps,omitempty"`
	// Refused counts changes the cloud refused under edge restriction
	// (their sequence numbers are still consumed), by reason in
	// RefusedReasons; the edge's copy returns to the cloud's value through
	// its next pull.
	Refused        int            `json:"refused,omitempty"`
	RefusedReasons map[string]int `json:"refused_reasons,omitempty"`
}

// AlertBatch is the body of POST /sync/v1/alerts: the latest value of
// alerts the edge raised or changed, each a pkg/rules Alert's JSON. Alerts
// travel beside the sequenced stream, not in it: an alert's copies merge
// as a semilattice (rules.Alert.Merge), so a re-send, a reordering or a
// skipped intermediate value changes nothing, and a cloud that does not
// know the path (an older release, 404) leaves them queued at the edge
// without holding up its readings.
type AlertBatch struct {
	Edge   string            `json:"edge"`
	Alerts []json.RawMessage `json:"alerts"`
}

// MaxBatchAlerts bounds an AlertBatch.
const MaxBatchAlerts = 1000

// AlertResult is the data of an alert push: how many alerts changed.
type AlertResult struct {
	Applied int `json:"applied"`
	// RejectedStamps counts transition stamps further ahead of the cloud's
	// clock than the maximum drift: kept with the oldest stamp, so they
	// lose to every real transition.
	RejectedStamps int `json:"rejected_stamps,omitempty"`
}

// StateBatch is the body of POST /sync/v1/state: state changes sent ahead of
// the sequenced stream. Applying them is idempotent.
type StateBatch struct {
	Edge    string   `json:"edge"`
	Changes []Change `json:"changes"`
}

// StateResult is the data of a state push.
type StateResult struct {
	Applied        int            `json:"applied"`
	RejectedStamps int            `json:"rejected_stamps,omitempty"`
	Refused        int            `json:"refused,omitempty"`
	RefusedReasons map[string]int `json:"refused_reasons,omitempty"`
}

// Policy is one Rego module distributed to edges.
type Policy struct {
	Name string `json:"name"` // file name, [A-Za-z0-9._-]+.rego
	Rego string `json:"rego"`
}

// PullPage is the data of GET /sync/v1/pull?cursor=&limit=.
type PullPage struct {
	Changes    []Change `json:"changes"`
	NextCursor string   `json:"next_cursor"`
	More       bool     `json:"more"`
	// Keys is the deployment's public signing keys as a JWKS document
	// ({"keys": [...]}), null before the cloud has one.
	Keys json.RawMessage `json:"keys,omitempty"`
	// Policies is every policy module the cloud distributes; nil means the
	// cloud distributes none (edges keep their local policies).
	Policies []Policy `json:"policies,omitempty"`
	// Edges is the current edge directory, whole: for an edge that sent
	// no set versions (QueryHave).
	Edges []Edge `json:"edges,omitempty"`
	// Rules is the rules the cloud distributes to the edge (its region's
	// and every region's), each a rule's JSON (pkg/rules.Rule), by name;
	// only in a versioned page (Versions) whose Versions.Rules differs from
	// the edge's, where nil means the cloud distributes none to it.
	Rules []json.RawMessage `json:"rules,omitempty"`
	// Versions is the cloud's version of each set, in a page for an edge
	// that sent the versions it holds. Keys and Policies are then in the
	// page only when their version differs from the edge's (Policies nil
	// then means the cloud distributes none), and the directory comes as
	// Directory instead of Edges, only when its version differs.
	Versions     *SetVersions    `json:"versions,omitempty"`
	Directory    *DirectoryDelta `json:"directory,omitempty"`
	ServerTimeMs int64           `json:"server_time_ms"`
}

// Location is a WGS-84 position in degrees.
type Location struct {
	Lat float64 `json:"lat"`
	Lng float64 `json:"lng"`
}

// Heartbeat is the body of POST /sync/v1/heartbeat.
type Heartbeat struct {
	Edge      string    `json:"edge"`
	Region    string    `json:"region,omitempty"`
	Location  *Location `json:"location,omitempty"`
	Advertise string    `json:"advertise,omitempty"`
	Backlog   uint64    `json:"backlog"`
	// OldestUnsyncedMs is the wall time of the oldest change still waiting
	// in the edge's outbox (0 when empty): the cloud shows the edge's lag.
	OldestUnsyncedMs int64 `json:"oldest_unsynced_ms,omitempty"`
}

// HeartbeatResult is the data of a heartbeat response.
type HeartbeatResult struct {
	// AckedSeq is the cloud's committed sequence for the edge: where a
	// restarted syncer resumes pushing.
	AckedSeq uint64 `json:"acked_seq"`
	// ServerTimeMs lets the edge see its clock offset from the cloud's.
	ServerTimeMs int64 `json:"server_time_ms"`
}

// Envelope is the body of every response of both daemons:
// {"code":0,"message":"ok","data":…} on success, {"code":<HTTP status>,
// "message":<why>,"data":null} on failure. Servers write Envelope[any]
// (pkg/httpenv); clients decode Envelope[json.RawMessage].
type Envelope[T any] struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
	Data    T      `json:"data"`
}

// MsgOK is the message of every successful response.
const MsgOK = "ok"

// ErrInvalid marks a request that fails validation; HTTP answers 400.
var ErrInvalid = errors.New("invalid")

// ruleError is a refusal whose message is meant for the client as is; it
// matches its sentinel (ErrInvalid, ErrTooLarge) with errors.Is without
// prefixing the sentinel's text to the message.
type ruleError struct {
	kind error
	msg  string
}

func (e *ruleError) Error() string { return e.msg }
func (e *ruleError) Unwrap() error { return e.kind }

func invalid(format string, a ...any) error {
	return &ruleError{kind: ErrInvalid, msg: fmt.Sprintf(format, a...)}
}

func tooLarge(format string, a ...any) error {
	return &ruleError{kind: ErrTooLarge, msg: fmt.Sprintf(format, a...)}
}

// ValidName reports whether s is a valid device or edge id:
// [A-Za-z0-9._-]{1,64}, not "." or ".." (the rule of ident.DeviceID, shared
// with the edge's MQTT decoder and HTTP API).
func ValidName(s string) bool { return ident.DeviceID(s) }

// Validate checks a push batch's shape; it does not check stamps against a
// clock (the cloud does that with hlc.Clock).
func (b *PushBatch) Validate() error {
	if !ValidName(b.Edge) {
		return invalid("edge %q must match [A-Za-z0-9._-]{1,64}", b.Edge)
	}
	if b.FirstSeq == 0 {
		return invalid("first_seq must be at least 1")
	}
	if len(b.Changes) == 0 {
		return invalid("changes must not be empty")
	}
	if len(b.Changes) > MaxBatchChanges {
		return invalid("batch has %d changes, at most %d allowed", len(b.Changes), MaxBatchChanges)
	}
	total := 0
	for i := range b.Changes {
		c := &b.Changes[i]
		total += len(c.Readings)
		if err := c.Validate(); err != nil {
			return fmt.Errorf("change %d (seq %d): %w", i, b.FirstSeq+uint64(i), err)
		}
	}
	if total > MaxReadingsTotal {
		return invalid("batch has %d readings, at most %d allowed", total, MaxReadingsTotal)
	}
	return nil
}

// Validate checks one edge-originated change.
func (c *Change) Validate() error {
	if len(c.Proof) > MaxProofBytes || len(c.Actor) > 128 {
		return invalid("change proof longer than %d bytes or actor longer than 128", MaxProofBytes)
	}
	if c.Kind == KindUser {
		if c.User == nil || c.User.OpenID == "" || len(c.User.OpenID) > 128 {
			return invalid("user change needs a user with an openid of 1 to 128 bytes")
		}
		if c.User.Stamp.IsZero() {
			return invalid("user change for %q has no stamp", c.User.OpenID)
		}
		return nil
	}
	if !ValidName(c.Device) {
		return invalid("device %q must match [A-Za-z0-9._-]{1,64}", c.Device)
	}
	switch c.Kind {
	case KindReadings:
		if len(c.Readings) == 0 {
			return invalid("readings change has no readings")
		}
		for j := range c.Readings {
			if err := c.Readings[j].Validate(); err != nil {
				return fmt.Errorf("reading %d: %w", j, err)
			}
		}
	case KindReported, KindDesired:
		if len(c.Doc) == 0 {
			return invalid("%s change has an empty doc", c.Kind)
		}
		if len(c.Doc) > MaxStateFields {
			return invalid("%s doc has %d fields, at most %d allowed", c.Kind, len(c.Doc), MaxStateFields)
		}
		for k, f := range c.Doc {
			if err := validFieldName(k); err != nil {
				return err
			}
			if f.Stamp.IsZero() {
				return invalid("state field %q has no stamp", k)
			}
			if !f.Deleted {
				if err := valueErr(k, f.Value); err != nil {
					return err
				}
			}
		}
	case KindMeta:
		if c.Meta == nil {
			return invalid("meta change has no meta")
		}
	default:
		return invalid("unknown change kind %q (want readings, reported, desired, meta or user)", c.Kind)
	}
	return nil
}

// Validate checks one reading.
func (r *Reading) Validate() error {
	if r.TS <= 0 {
		return invalid("ts must be positive Unix milliseconds")
	}
	if len(r.ID) > 128 {
		return invalid("id longer than 128 bytes")
	}
	if r.Metrics != nil && r.Sorted != nil {
		return invalid("reading has metrics in both forms")
	}
	n := len(r.Metrics) + len(r.Sorted)
	if n == 0 {
		return invalid("metrics must not be empty")
	}
	if n > MaxMetrics {
		return invalid("%d metrics, at most %d allowed", n, MaxMetrics)
	}
	for k, v := range r.Metrics {
		if err := validMetric(k, v); err != nil {
			return err
		}
	}
	for i, m := range r.Sorted {
		if err := validMetric(m.Name, m.Value); err != nil {
			return err
		}
		if i > 0 && r.Sorted[i-1].Name >= m.Name {
			return invalid("metrics not sorted by name, or metric %q twice", m.Name)
		}
	}
	return nil
}

func validMetric(k string, v float64) error {
	if k == "" || len(k) > 128 {
		return invalid("metric name %q must be 1 to 128 bytes", k)
	}
	if math.IsNaN(v) || math.IsInf(v, 0) {
		return invalid("metric %q is not a finite number", k)
	}
	return nil
}

// Validate checks a state batch: only state kinds, no readings.
func (b *StateBatch) Validate() error {
	if !ValidName(b.Edge) {
		return invalid("edge %q must match [A-Za-z0-9._-]{1,64}", b.Edge)
	}
	if len(b.Changes) > MaxBatchChanges {
		return invalid("batch has %d changes, at most %d allowed", len(b.Changes), MaxBatchChanges)
	}
	for i := range b.Changes {
		c := &b.Changes[i]
		if c.Kind == KindReadings {
			return invalid("change %d: readings travel only in the sequenced push", i)
		}
		if err := c.Validate(); err != nil {
			return fmt.Errorf("change %d: %w", i, err)
		}
	}
	return nil
}

// Validate checks a heartbeat.
func (h *Heartbeat) Validate() error {
	if !ValidName(h.Edge) {
		return invalid("edge %q must match [A-Za-z0-9._-]{1,64}", h.Edge)
	}
	if l := h.Location; l != nil && !l.Valid() {
		return invalid("location %v,%v is not a valid latitude,longitude", l.Lat, l.Lng)
	}
	if len(h.Region) > 64 {
		return invalid("region too long")
	}
	return CheckAdvertise(h.Advertise)
}
