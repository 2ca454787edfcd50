package ingest

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync/atomic"
	"time"

	"github.com/valyala/fastjson"

	"github.com/outpost-edge/outpost/pkg/ident"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// ErrInvalid marks a message that can never be ingested; it goes to the
// dead-letter log with the reason instead of being retried.
var ErrInvalid = errors.New("invalid message")

// ErrTooOld marks a reading older than the edge keeps readings (its
// retention): storing and acknowledging it would only have the next
// retention pass delete it without a word. Such a message is invalid too
// (a dead letter), and counted apart.
var ErrTooOld = errors.New("reading older than the edge's retention")

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))
}

// Limits bound what one message may carry.
type Limits struct {
	MaxPayload  int           // bytes
	MaxReadings int           // readings in one array payload
	MaxMetrics  int           // metrics in one reading
	MaxFields   int           // fields in one state message
	MaxFuture   time.Duration // how far ahead of receive time a ts may be
	// MaxAge is how far behind receive time a reading's ts may be: the
	// edge's retention (0: no limit).
	MaxAge time.Duration
}

// DefaultLimits are generous for sensors and small enough that one message
// cannot hog the writer.
var DefaultLimits = Limits{
	MaxPayload:  256 << 10,
	MaxReadings: 10000,
	MaxMetrics:  256,
	MaxFields:   wire.MaxStateFields,
	MaxFuture:   24 * time.Hour,
}

// minTS rejects stamps from devices whose clock was never set (boot at 1970).
var minTS = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC).UnixMilli()

// Topic kinds.
const (
	KindTelemetry = "telemetry"
	KindState     = "state"
)

// ParseTopic splits sensors/{device}/{telemetry|state}.
func ParseTopic(topic string) (device, kind string, err error) {
	rest, ok := strings.CutPrefix(topic, "sensors/")
	if !ok {
		return "", "", invalid("topic %q is not below sensors/", topic)
	}
	device, kind, ok = strings.Cut(rest, "/")
	if !ok || (kind != KindTelemetry && kind != KindState) {
		return "", "", invalid("topic %q is not sensors/{device}/telemetry or sensors/{device}/state", topic)
	}
	if !ValidDeviceID(device) {
		return "", "", invalid("device id %q must match [A-Za-z0-9._-]{1,64}", device)
	}
	return device, kind, nil
}

// ValidDeviceID reports whether id matches [A-Za-z0-9._-]{1,64}.
func ValidDeviceID(id string) bool { return ident.DeviceID(id) }

// Decoder turns MQTT messages into store items. It is safe for concurrent use.
type Decoder struct {
	limits Limits
	pool   fastjson.ParserPool
	names  names
}

// names interns metric names: devices send the same few names in every
// message, and each would otherwise be a string of its own, allocated on
// the submitting goroutine and kept until the commit. A slot holds the
// last name that hashed to it; a miss allocates as without it.
type names struct {
	slots [512]atomic.Pointer[string]
}

func (n *names) intern(b []byte) string {
	h := uint32(2166136261) // FNV-1a
	for _, c := range b {
		h ^= uint32(c)
		h *= 16777619
	}
	slot := &n.slots[h%uint32(len(n.slots))]
	if p := slot.Load(); p != nil && *p == string(b) {
		return *p
	}
	s := string(b)
	slot.Store(&s)
	return s
}

// NewDecoder returns a decoder enforcing limits; zero fields take the
// DefaultLimits value.
func NewDecoder(limits Limits) *Decoder {
	def := DefaultLimits
	if limits.MaxPayload <= 0 {
		limits.MaxPayload = def.MaxPayload
	}
	if limits.MaxReadings <= 0 {
		limits.MaxReadings = def.MaxReadings
	}
	if limits.MaxMetrics <= 0 {
		limits.MaxMetrics = def.MaxMetrics
	}
	if limits.MaxFields <= 0 {
		limits.MaxFields = def.MaxFields
	}
	if limits.MaxFuture <= 0 {
		limits.MaxFuture = def.MaxFuture
	}
	return &Decoder{limits: limits}
}

// dupKey returns the first key that appears twice in a JSON object, or "".
// JSON parsers disagree on which duplicate wins, so such payloads are
// ambiguous and rejected rather than guessed at.
func dupKey(obj *fastjson.Object) string {
	dup := ""
	if obj.Len() > len([smallObject][]byte{}) {
		seen := make(map[string]struct{}, obj.Len())
		obj.Visit(func(k []byte, _ *fastjson.Value) {
			if dup != "" {
				return
			}
			if _, ok := seen[string(k)]; ok {
				dup = string(k)
				return
			}
			seen[string(k)] = struct{}{}
		})
		return dup
	}
	// A reading has a handful of keys: comparing each with those before
	// it costs less than a map.
	var keys [smallObject][]byte
	n := 0
	obj.Visit(func(k []byte, _ *fastjson.Value) {
		if dup != "" {
			return
		}
		for _, s := range keys[:n] {
			if string(s) == string(k) {
				dup = string(k)
				return
			}
		}
		keys[n] = k
		n++
	})
	return dup
}

// smallObject is the most keys dupKey compares pairwise.
const smallObject = 16

// Decode validates one message received at now.
func (d *Decoder) Decode(topic string, payload []byte, now time.Time) (store.Item, error) {
	device, kind, err := ParseTopic(topic)
	if err != nil {
		return store.Item{}, err
	}
	if len(payload) > d.limits.MaxPayload {
		return store.Item{}, invalid("payload of %d bytes exceeds the %d byte limit", len(payload), d.limits.MaxPayload)
	}
	// The shared JSON rules first (depth, UTF-8, finite numbers, and the
	// grammar, which fastjson is lax about: it takes NaN, 01 and .5): what
	// passes here is stored and served back as is.
	if err := wire.CheckJSON(payload, wire.MaxJSONDepth); err != nil {
		if errors.Is(err, wire.ErrJSONSyntax) {
			return store.Item{}, invalid("payload is not valid JSON: %v", err)
		}
		return store.Item{}, invalid("payload refused: %v", err)
	}
	p := d.pool.Get()
	defer d.pool.Put(p)
	v, err := p.ParseBytes(payload)
	if err != nil {
		return store.Item{}, invalid("payload is not valid JSON: %v", err)
	}
	it := store.Item{Device: device, ReceivedAt: now.UnixMilli()}
	if kind == KindState {
		it.State, err = d.state(v, now)
		return it, err
	}
	switch v.Type() {
	case fastjson.TypeObject:
		r, err := d.reading(v, now)
		if err != nil {
			return it, err
		}
		it.Readings = []store.Reading{r}
	case fastjson.TypeArray:
		arr, _ := v.Array()
		if len(arr) == 0 {
			return it, invalid("telemetry array is empty")
		}
		if len(arr) > d.limits.MaxReadings {
			return it, invalid("telemetry array has %d readings, at most %d allowed", len(arr), d.limits.MaxReadings)
		}
		it.Readings = make([]store.Reading, 0, len(arr))
		for i, e := range arr {
			if e.Type() != fastjson.TypeObject {
				return it, invalid("reading %d is not a JSON object", i)
			}
			r, err := d.reading(e, now)
			if err != nil {
				return it, fmt.Errorf("reading %d: %w", i, err)
			}
			it.Readings = append(it.Readings, r)
		}
	default:
		return it, invalid("telemetry must be a JSON object or an array of objects, got %s", v.Type())
	}
	return it, nil
}

func (d *Decoder) reading(v *fastjson.Value, now time.Time) (store.Reading, error) {
	var r store.Reading
	if o, _ := v.Object(); o != nil {
		if k := dupKey(o); k != "" {
			return r, invalid("key %q appears twice in a reading", k)
		}
	}
	tsv := v.Get("ts")
	ts, err := d.ts(tsv, now)
	if err != nil {
		return r, err
	}
	if d.limits.MaxAge > 0 && ts < now.Add(-d.limits.MaxAge).UnixMilli() {
		return r, fmt.Errorf("%w: %w: ts %d is more than %s (ingest.retention) behind the edge clock", ErrInvalid, ErrTooOld, ts, d.limits.MaxAge)
	}
	r.TS = ts
	r.ReceiveTS = tsv == nil || tsv.Type() == fastjson.TypeNull
	if idv := v.Get("id"); idv != nil && idv.Type() != fastjson.TypeNull {
		id, err := idv.StringBytes()
		if err != nil {
			return r, invalid("id must be a string")
		}
		if len(id) == 0 || len(id) > 128 {
			return r, invalid("id must be 1 to 128 bytes")
		}
		for _, c := range id {
			if c < 0x20 || c == 0x7f {
				return r, invalid("id contains control characters")
			}
		}
		r.ID = string(id)
	}
	mv := v.Get("metrics")
	if mv == nil {
		return r, invalid(`missing "metrics" object`)
	}
	obj, err := mv.Object()
	if err != nil {
		return r, invalid(`"metrics" must be a JSON object`)
	}
	n := obj.Len()
	if n == 0 {
		return r, invalid(`"metrics" is empty`)
	}
	if n > d.limits.MaxMetrics {
		return r, invalid("%d metrics in one reading, at most %d allowed", n, d.limits.MaxMetrics)
	}
	r.Metrics = make([]store.Metric, 0, n)
	obj.Visit(func(k []byte, mv *fastjson.Value) {
		if err != nil {
			return
		}
		name := d.names.intern(k)
		if !ident.Valid(name, 64) {
			err = invalid("metric name %q must match [A-Za-z0-9._-]{1,64}", name)
			return
		}
		if mv.Type() != fastjson.TypeNumber {
			err = invalid("metric %q must be a number, got %s", name, mv.Type())
			return
		}
		f, ferr := mv.Float64()
		if ferr != nil || math.IsInf(f, 0) || math.IsNaN(f) {
			err = invalid("metric %q is not a finite number", name)
			return
		}
		for _, m := range r.Metrics {
			if m.Name == name {
				err = invalid("metric %q appears twice", name)
				return
			}
		}
		r.Metrics = append(r.Metrics, store.Metric{Name: name, Value: f})
	})
	return r, err
}

func (d *Decoder) ts(v *fastjson.Value, now time.Time) (int64, error) {
	var ts int64
	switch {
	case v == nil || v.Type() == fastjson.TypeNull:
		return now.UnixMilli(), nil
	case v.Type() == fastjson.TypeNumber:
		f, err := v.Float64()
		if err != nil || f != math.Trunc(f) || math.Abs(f) > 1<<53 {
			return 0, invalid("ts must be integer Unix milliseconds")
		}
		ts = int64(f)
	case v.Type() == fastjson.TypeString:
		s, _ := v.StringBytes()
		t, err := time.Parse(time.RFC3339Nano, string(s))
		if err != nil {
			return 0, invalid("ts %q is neither Unix milliseconds nor RFC 3339", s)
		}
		ts = t.UnixMilli()
	default:
		return 0, invalid("ts must be Unix milliseconds or an RFC 3339 string")
	}
	if ts < minTS {
		return 0, invalid("ts %d is before 2000-01-01: is the device clock set?", ts)
	}
	if limit := now.Add(d.limits.MaxFuture).UnixMilli(); ts > limit {
		return 0, invalid("ts %d is more than %s ahead of the edge clock", ts, d.limits.MaxFuture)
	}
	return ts, nil
}

func (d *Decoder) state(v *fastjson.Value, now time.Time) (map[string]json.RawMessage, error) {
	if v.Type() != fastjson.TypeObject {
		return nil, invalid("state payload must be a JSON object")
	}
	if o, _ := v.Object(); o != nil {
		if k := dupKey(o); k != "" {
			return nil, invalid("key %q appears twice in a state message", k)
		}
	}
	if _, err := d.ts(v.Get("ts"), now); err != nil {
		return nil, err
	}
	sv := v.Get("state")
	if sv == nil {
		return nil, invalid(`missing "state" object`)
	}
	obj, err := sv.Object()
	if err != nil {
		return nil, invalid(`"state" must be a JSON object`)
	}
	if obj.Len() == 0 {
		return nil, invalid(`"state" is empty`)
	}
	if obj.Len() > d.limits.MaxFields {
		return nil, invalid("%d state fields, at most %d allowed", obj.Len(), d.limits.MaxFields)
	}
	out := make(map[string]json.RawMessage, obj.Len())
	obj.Visit(func(k []byte, fv *fastjson.Value) {
		if err != nil {
			return
		}
		if len(k) == 0 || len(k) > 128 {
			err = invalid("state field name must be 1 to 128 bytes")
			return
		}
		if _, ok := out[string(k)]; ok {
			err = invalid("state field %q appears twice", k)
			return
		}
		// The payload passed wire.CheckJSON, so the value is JSON by the
		// shared rules; wire.ValidateState below checks each value again,
		// as every other writer of state does.
		out[string(k)] = fv.MarshalTo(nil)
	})
	if err != nil {
		return nil, err
	}
	// The limits the edge's API and the cloud apply too (value size above
	// all): a state a device may set is one an admin could set.
	if verr := wire.ValidateState(out); verr != nil {
		return nil, invalid("%s", verr)
	}
	return out, nil
}
