package ingest

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"
	"unsafe"

	"github.com/outpost-edge/outpost/pkg/ident"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/wire"
)

var testNow = time.Date(2024, 11, 21, 6, 20, 0, 123e6, time.UTC)

func TestParseTopic(t *testing.T) {
	long := strings.Repeat("a", 64)
	tests := []struct {
		topic, device, kind string
		wantErr             string
	}{
		{topic: "sensors/dev-1/telemetry", device: "dev-1", kind: KindTelemetry},
		{topic: "sensors/A.b_C-9/state", device: "A.b_C-9", kind: KindState},
		{topic: "sensors/" + long + "/telemetry", device: long, kind: KindTelemetry},
		{topic: "sensors/" + long + "a/telemetry", wantErr: "must match [A-Za-z0-9._-]{1,64}"},
		{topic: "sensors//telemetry", wantErr: "must match"},
		{topic: "sensors/dev 1/telemetry", wantErr: "must match"},
		{topic: "sensors/dév/telemetry", wantErr: "must match"},
		{topic: "sensors/+/telemetry", wantErr: "must match"},
		{topic: "sensors/#/state", wantErr: "must match"},
		{topic: "devices/dev/telemetry", wantErr: "is not below sensors/"},
		{topic: "sensors/dev", wantErr: "is not sensors/{device}/telemetry or sensors/{device}/state"},
		{topic: "sensors/dev/", wantErr: "is not sensors/{device}/telemetry"},
		{topic: "sensors/dev/other", wantErr: "is not sensors/{device}/telemetry"},
		{topic: "sensors/dev/telemetry/extra", wantErr: "is not sensors/{device}/telemetry"},
		{topic: "", wantErr: "is not below sensors/"},
	}
	for _, tt := range tests {
		t.Run(tt.topic, func(t *testing.T) {
			dev, kind, err := ParseTopic(tt.topic)
			if tt.wantErr != "" {
				checkInvalid(t, err, tt.wantErr)
				return
			}
			if err != nil {
				t.Fatalf("ParseTopic(%q): %v", tt.topic, err)
			}
			if dev != tt.device || kind != tt.kind {
				t.Fatalf("ParseTopic(%q) = %q, %q; want %q, %q", tt.topic, dev, kind, tt.device, tt.kind)
			}
		})
	}
}

func checkInvalid(t *testing.T, err error, want string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want one containing %q", want)
	}
	if !errors.Is(err, ErrInvalid) {
		t.Fatalf("error %q does not wrap ErrInvalid", err)
	}
	if !strings.Contains(err.Error(), want) {
		t.Fatalf("error %q does not contain %q", err, want)
	}
}

func m(pairs ...any) []store.Metric {
	var out []store.Metric
	for i := 0; i < len(pairs); i += 2 {
		out = append(out, store.Metric{Name: pairs[i].(string), Value: pairs[i+1].(float64)})
	}
	return out
}

func TestDecodeTelemetry(t *testing.T) {
	const topic = "sensors/dev-1/telemetry"
	ts := int64(1732170000123)
	nowMs := testNow.UnixMilli()
	tests := []struct {
		name    string
		payload string
		want    []store.Reading
	}{
		{"object with unix ms", `{"ts": 1732170000123, "id": "m-1", "metrics": {"temp": 21.5, "hum": 40}}`,
			[]store.Reading{{TS: ts, ID: "m-1", Metrics: m("temp", 21.5, "hum", 40.0)}}},
		{"rfc3339", `{"ts": "2024-11-21T06:20:00.123Z", "metrics": {"t": -1}}`,
			[]store.Reading{{TS: ts, Metrics: m("t", -1.0)}}},
		{"rfc3339 with offset", `{"ts": "2024-11-21T14:20:00.123+08:00", "metrics": {"t": 0}}`,
			[]store.Reading{{TS: ts, Metrics: m("t", 0.0)}}},
		{"absent ts is receive time", `{"metrics": {"t": 1e3}}`,
			[]store.Reading{{TS: nowMs, ReceiveTS: true, Metrics: m("t", 1000.0)}}},
		{"null ts is receive time", `{"ts": null, "id": null, "metrics": {"t": 1}}`,
			[]store.Reading{{TS: nowMs, ReceiveTS: true, Metrics: m("t", 1.0)}}},
		{"ts exactly 2000", `{"ts": 946684800000, "metrics": {"t": 1}}`,
			[]store.Reading{{TS: 946684800000, Metrics: m("t", 1.0)}}},
		{"ts at the future limit", fmt.Sprintf(`{"ts": %d, "metrics": {"t": 1}}`, nowMs+24*3600*1000),
			[]store.Reading{{TS: nowMs + 24*3600*1000, Metrics: m("t", 1.0)}}},
		{"ts as float with integral value", `{"ts": 1.732170000123e12, "metrics": {"t": 1}}`,
			[]store.Reading{{TS: ts, Metrics: m("t", 1.0)}}},
		{"metric name charset", `{"metrics": {"a.B_c-9": 1, "x": 1.7e308}}`,
			[]store.Reading{{TS: nowMs, ReceiveTS: true, Metrics: m("a.B_c-9", 1.0, "x", 1.7e308)}}},
		{"array", `[{"ts": 1732170000123, "id": "a", "metrics": {"t": 1}}, {"id": "b", "metrics": {"t": 2}}]`,
			[]store.Reading{{TS: ts, ID: "a", Metrics: m("t", 1.0)}, {TS: nowMs, ID: "b", Metrics: m("t", 2.0), ReceiveTS: true}}},
		{"id with unicode", `{"id": "时间-1", "metrics": {"t": 1}}`,
			[]store.Reading{{TS: nowMs, ReceiveTS: true, ID: "时间-1", Metrics: m("t", 1.0)}}},
		{"whitespace around", " \n{\"metrics\":{\"t\":1}}\t ", []store.Reading{{TS: nowMs, ReceiveTS: true, Metrics: m("t", 1.0)}}},
		{"unknown keys ignored", `{"metrics": {"t": 1}, "extra": [1,2]}`, []store.Reading{{TS: nowMs, ReceiveTS: true, Metrics: m("t", 1.0)}}},
	}
	dec := NewDecoder(DefaultLimits)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			it, err := dec.Decode(topic, []byte(tt.payload), testNow)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if it.Device != "dev-1" || it.ReceivedAt != nowMs || it.State != nil {
				t.Fatalf("item = %+v", it)
			}
			if fmt.Sprint(it.Readings) != fmt.Sprint(tt.want) {
				t.Fatalf("readings = %+v\nwant %+v", it.Readings, tt.want)
			}
		})
	}
}

func TestDecodeErrors(t *testing.T) {
	nowMs := testNow.UnixMilli()
	small := Limits{MaxPayload: 200, MaxReadings: 2, MaxMetrics: 2, MaxFields: 2, MaxFuture: time.Minute}
	tests := []struct {
		name, topic, payload string
		limits               *Limits
		want                 string
	}{
		{"bad topic", "sensors/a b/telemetry", `{"metrics":{"t":1}}`, nil, "must match [A-Za-z0-9._-]{1,64}"},
		{"empty payload", "", "", nil, "payload is not valid JSON"},
		{"not json", "", "{metrics", nil, "payload is not valid JSON"},
		{"trailing garbage", "", `{"metrics":{"t":1}} x`, nil, "payload is not valid JSON"},
		{"too large", "", `{"metrics":{"t":1}, "pad":"` + strings.Repeat("x", 200) + `"}`, &small, "exceeds the 200 byte limit"},
		{"scalar", "", `42`, nil, "telemetry must be a JSON object or an array of objects, got number"},
		{"string", "", `"x"`, nil, "got string"},
		{"empty array", "", `[]`, nil, "telemetry array is empty"},
		{"too many readings", "", `[{"metrics":{"t":1}},{"metrics":{"t":1}},{"metrics":{"t":1}}]`, &small, "telemetry array has 3 readings, at most 2 allowed"},
		{"array of scalars", "", `[1]`, nil, "reading 0 is not a JSON object"},
		{"bad element names index", "", `[{"metrics":{"t":1}},{"metrics":{}}]`, nil, `reading 1: invalid message: "metrics" is empty`},
		{"missing metrics", "", `{"ts": 1732170000123}`, nil, `missing "metrics" object`},
		{"metrics not object", "", `{"metrics": [1]}`, nil, `"metrics" must be a JSON object`},
		{"empty metrics", "", `{"metrics": {}}`, nil, `"metrics" is empty`},
		{"too many metrics", "", `{"metrics": {"a":1,"b":2,"c":3}}`, &small, "3 metrics in one reading, at most 2 allowed"},
		{"string metric", "", `{"metrics": {"t": "21.5"}}`, nil, `metric "t" must be a number, got string`},
		{"bool metric", "", `{"metrics": {"t": true}}`, nil, `metric "t" must be a number, got true`},
		{"null metric", "", `{"metrics": {"t": null}}`, nil, `metric "t" must be a number, got null`},
		{"object metric", "", `{"metrics": {"t": {"v":1}}}`, nil, `metric "t" must be a number, got object`},
		{"NaN metric", "", `{"metrics": {"t": NaN}}`, nil, "payload is not valid JSON"},
		{"Inf metric", "", `{"metrics": {"t": -Inf}}`, nil, "payload is not valid JSON"},
		{"overflowing metric", "", `{"metrics": {"t": 1e400}}`, nil, "payload refused: JSON number out of range"},
		{"bad metric name", "", `{"metrics": {"a b": 1}}`, nil, `metric name "a b" must match`},
		{"empty metric name", "", `{"metrics": {"": 1}}`, nil, `metric name "" must match`},
		{"long metric name", "", `{"metrics": {"` + strings.Repeat("m", 65) + `": 1}}`, nil, `must match [A-Za-z0-9._-]{1,64}`},
		{"duplicate metric", "", `{"metrics": {"t": 1, "t": 2}}`, nil, `metric "t" appears twice`},
		{"duplicate ts", "", `{"ts": 1732170000123, "ts": "2024-11-21T06:20:00Z", "metrics": {"t": 1}}`, nil, `key "ts" appears twice`},
		{"duplicate metrics object", "", `{"metrics": {"t": 1}, "metrics": {"u": 1}}`, nil, `key "metrics" appears twice`},
		{"id not string", "", `{"id": 7, "metrics": {"t": 1}}`, nil, "id must be a string"},
		{"empty id", "", `{"id": "", "metrics": {"t": 1}}`, nil, "id must be 1 to 128 bytes"},
		{"long id", "", `{"id": "` + strings.Repeat("i", 129) + `", "metrics": {"t": 1}}`, nil, "id must be 1 to 128 bytes"},
		{"id control char", "", `{"id": "a\nb", "metrics": {"t": 1}}`, nil, "id contains control characters"},
		{"ts fractional ms", "", `{"ts": 1732170000123.5, "metrics": {"t": 1}}`, nil, "ts must be integer Unix milliseconds"},
		{"ts NaN", "", `{"ts": NaN, "metrics": {"t": 1}}`, nil, "payload is not valid JSON"},
		{"ts huge", "", `{"ts": 1e300, "metrics": {"t": 1}}`, nil, "ts must be integer Unix milliseconds"},
		{"ts seconds not ms", "", `{"ts": 1732170000, "metrics": {"t": 1}}`, nil, "is before 2000-01-01: is the device clock set?"},
		{"ts negative", "", `{"ts": -1, "metrics": {"t": 1}}`, nil, "is before 2000-01-01"},
		{"ts zero", "", `{"ts": 0, "metrics": {"t": 1}}`, nil, "is before 2000-01-01"},
		{"ts just before 2000", "", `{"ts": 946684799999, "metrics": {"t": 1}}`, nil, "is before 2000-01-01"},
		{"rfc3339 1970", "", `{"ts": "1970-01-01T00:00:00Z", "metrics": {"t": 1}}`, nil, "is before 2000-01-01"},
		{"ts too far ahead", "", fmt.Sprintf(`{"ts": %d, "metrics": {"t": 1}}`, nowMs+24*3600*1000+1), nil, "is more than 24h0m0s ahead of the edge clock"},
		{"ts ahead of small limit", "", fmt.Sprintf(`{"ts": %d, "metrics": {"t": 1}}`, nowMs+61000), &small, "more than 1m0s ahead"},
		{"ts bad string", "", `{"ts": "yesterday", "metrics": {"t": 1}}`, nil, `ts "yesterday" is neither Unix milliseconds nor RFC 3339`},
		{"ts date only", "", `{"ts": "2024-11-21", "metrics": {"t": 1}}`, nil, "neither Unix milliseconds nor RFC 3339"},
		{"ts bool", "", `{"ts": true, "metrics": {"t": 1}}`, nil, "ts must be Unix milliseconds or an RFC 3339 string"},
		{"ts object", "", `{"ts": {}, "metrics": {"t": 1}}`, nil, "ts must be Unix milliseconds or an RFC 3339 string"},
		// state
		{"state not object", "state", `[1]`, nil, "state payload must be a JSON object"},
		{"state missing", "state", `{"ts": 1732170000123}`, nil, `missing "state" object`},
		{"state not object field", "state", `{"state": "on"}`, nil, `"state" must be a JSON object`},
		{"state empty", "state", `{"state": {}}`, nil, `"state" is empty`},
		{"state too many fields", "state", `{"state": {"a":1,"b":2,"c":3}}`, &small, "3 state fields, at most 2 allowed"},
		{"state empty field name", "state", `{"state": {"": 1}}`, nil, "state field name must be 1 to 128 bytes"},
		{"state long field name", "state", `{"state": {"` + strings.Repeat("f", 129) + `": 1}}`, nil, "state field name must be 1 to 128 bytes"},
		{"state bad ts", "state", `{"ts": 5, "state": {"a": 1}}`, nil, "is before 2000-01-01"},
		{"state duplicate field", "state", `{"state": {"a": 1, "a": 2}}`, nil, `state field "a" appears twice`},
		{"state duplicate key", "state", `{"state": {"a": 1}, "state": {"b": 2}}`, nil, `key "state" appears twice`},
		{"state NaN value", "state", `{"state": {"a": NaN}}`, nil, "payload is not valid JSON"},
		{"state nested Inf", "state", `{"state": {"a": {"b": [Inf]}}}`, nil, "payload is not valid JSON"},
		{"state non-json number", "state", `{"state": {"a": 01}}`, nil, "payload is not valid JSON"},
		// The value limit the edge's API and the cloud apply too.
		{"state value too large", "state", `{"state": {"a": "` + strings.Repeat("v", 16<<10) + `"}}`, nil, `state field "a" is 16386 bytes, at most 16384 allowed`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			lim := DefaultLimits
			if tt.limits != nil {
				lim = *tt.limits
			}
			topic := "sensors/dev/telemetry"
			switch tt.topic {
			case "state":
				topic = "sensors/dev/state"
			case "":
			default:
				topic = tt.topic
			}
			_, err := NewDecoder(lim).Decode(topic, []byte(tt.payload), testNow)
			checkInvalid(t, err, tt.want)
		})
	}
}

func TestDecodeState(t *testing.T) {
	dec := NewDecoder(DefaultLimits)
	tests := []struct {
		name, payload string
		want          map[string]string
	}{
		{"strings", `{"ts": 1732170000123, "state": {"fw": "1.2", "mode": "eco"}}`, map[string]string{"fw": `"1.2"`, "mode": `"eco"`}},
		{"rfc3339 ts and mixed values", `{"ts": "2024-11-21T06:20:00Z", "state": {"n": 1.5, "on": true, "cfg": {"a": [1, "x"]}}}`,
			map[string]string{"n": `1.5`, "on": `true`, "cfg": `{"a":[1,"x"]}`}},
		{"null deletes", `{"state": {"fw": null}}`, map[string]string{"fw": `null`}},
		{"field names are free-form", `{"state": {"a b/c": "x"}}`, map[string]string{"a b/c": `"x"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			it, err := dec.Decode("sensors/d.1/state", []byte(tt.payload), testNow)
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if it.Device != "d.1" || len(it.Readings) != 0 {
				t.Fatalf("item = %+v", it)
			}
			got := map[string]string{}
			for k, v := range it.State {
				got[k] = string(v)
			}
			if fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Fatalf("state = %v, want %v", got, tt.want)
			}
		})
	}
}

// TestDecoderZeroLimitsUseDefaults guards against a zero Limits value
// rejecting every message.
func TestDecoderZeroLimitsUseDefaults(t *testing.T) {
	it, err := NewDecoder(Limits{}).Decode("sensors/d/telemetry", []byte(`{"metrics":{"t":1}}`), testNow)
	if err != nil || len(it.Readings) != 1 {
		t.Fatalf("Decode with zero limits: %+v, %v", it, err)
	}
}

// TestDecodeDoesNotAlias checks that results do not point into the pooled
// parser's memory: decoding another message must not change them.
func TestDecodeDoesNotAlias(t *testing.T) {
	dec := NewDecoder(DefaultLimits)
	a, err := dec.Decode("sensors/d/telemetry", []byte(`{"id":"first","metrics":{"aaaa":1}}`), testNow)
	if err != nil {
		t.Fatal(err)
	}
	s, err := dec.Decode("sensors/d/state", []byte(`{"state":{"k":"first"}}`), testNow)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 10; i++ {
		dec.Decode("sensors/d/telemetry", []byte(`{"id":"zzzzz","metrics":{"bbbb":2}}`), testNow)
		dec.Decode("sensors/d/state", []byte(`{"state":{"k":"zzzzz"}}`), testNow)
	}
	if a.Readings[0].ID != "first" || a.Readings[0].Metrics[0].Name != "aaaa" || string(s.State["k"]) != `"first"` {
		t.Fatalf("results changed after later decodes: %+v %s", a.Readings, s.State["k"])
	}
}

func FuzzDecode(f *testing.F) {
	// The checked-in corpus in testdata/fuzz/FuzzDecode holds more seeds.
	f.Add("sensors/d1/telemetry", []byte(`{"ts": 1732170000123, "id": "x", "metrics": {"temp": 21.5}}`))
	f.Add("sensors/d1/state", []byte(`{"state": {"fw": "1.2"}}`))
	dec := NewDecoder(Limits{MaxPayload: 4096, MaxReadings: 50, MaxMetrics: 20, MaxFields: 20, MaxFuture: time.Hour})
	f.Fuzz(func(t *testing.T, topic string, payload []byte) {
		it, err := dec.Decode(topic, payload, testNow)
		if err != nil {
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %q does not wrap ErrInvalid", err)
			}
			if !utf8.ValidString(err.Error()) && utf8.Valid(payload) && utf8.ValidString(topic) {
				t.Fatalf("error text is not UTF-8: %q", err)
			}
			return
		}
		if !ValidDeviceID(it.Device) {
			t.Fatalf("accepted device id %q", it.Device)
		}
		if it.ReceivedAt != testNow.UnixMilli() {
			t.Fatalf("ReceivedAt = %d", it.ReceivedAt)
		}
		if (len(it.Readings) == 0) == (it.State == nil) {
			t.Fatalf("item must carry readings or state, not both or neither: %+v", it)
		}
		for _, r := range it.Readings {
			if r.TS < minTS || r.TS > testNow.Add(time.Hour).UnixMilli() {
				t.Fatalf("accepted ts %d", r.TS)
			}
			if len(r.Metrics) == 0 || len(r.Metrics) > 20 {
				t.Fatalf("accepted %d metrics", len(r.Metrics))
			}
			if len(r.ID) > 128 {
				t.Fatalf("accepted id of %d bytes", len(r.ID))
			}
			seen := map[string]bool{}
			for _, mt := range r.Metrics {
				if !ident.Valid(mt.Name, 64) || seen[mt.Name] {
					t.Fatalf("accepted metric name %q (seen %v)", mt.Name, seen[mt.Name])
				}
				seen[mt.Name] = true
				if math.IsNaN(mt.Value) || math.IsInf(mt.Value, 0) {
					t.Fatalf("accepted non-finite metric %v", mt.Value)
				}
			}
		}
		if it.State != nil {
			if len(it.State) == 0 || len(it.State) > 20 {
				t.Fatalf("accepted %d state fields", len(it.State))
			}
			for k, v := range it.State {
				if k == "" || !json.Valid(v) || wire.CheckValue(v) != nil {
					t.Fatalf("accepted state field %q = %s", k, v)
				}
			}
			// The store encodes the reported state as JSON; it must not fail.
			if _, err := json.Marshal(it.State); err != nil {
				t.Fatalf("accepted state that cannot be encoded: %v", err)
			}
		}
	})
}

// Metric names are interned: a name seen before is the same string, and
// names that share a slot (more names than slots) still decode as sent,
// from concurrent submitters.
func TestDecodeInternsMetricNames(t *testing.T) {
	dec := NewDecoder(DefaultLimits)
	decode := func(names ...string) []store.Metric {
		var b strings.Builder
		b.WriteString(`{"ts":` + strconv.FormatInt(testNow.UnixMilli(), 10) + `,"metrics":{`)
		for i, n := range names {
			if i > 0 {
				b.WriteByte(',')
			}
			b.WriteString(`"` + n + `":` + strconv.Itoa(i))
		}
		b.WriteString(`}}`)
		it, err := dec.Decode("sensors/d1/telemetry", []byte(b.String()), testNow)
		if err != nil {
			t.Error(err)
			return nil
		}
		return it.Readings[0].Metrics
	}
	a, b := decode("temp", "hum"), decode("temp", "hum")
	if unsafe.StringData(a[0].Name) != unsafe.StringData(b[0].Name) || unsafe.StringData(a[1].Name) != unsafe.StringData(b[1].Name) {
		t.Fatal("a repeated metric name was allocated again")
	}
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 3000 {
				n := fmt.Sprintf("m%d", (i*7+g)%2000)
				if ms := decode(n, "temp"); len(ms) != 2 || ms[0].Name != n || ms[1].Name != "temp" || ms[1].Value != 1 {
					t.Errorf("decoded %+v for metrics %s, temp", ms, n)
					return
				}
			}
		})
	}
	wg.Wait()
}
