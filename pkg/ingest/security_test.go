package ingest

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/outpost-edge/outpost/pkg/wire"
)

// JSON the daemons accept and serve back: 5000-level nesting, 1e400 and
// invalid UTF-8 were accepted in MQTT payloads, stored, and then served in
// the device list, where clients crashed parsing them. Each is now a dead
// letter with the reason, and nothing of it reaches the device's state.
func TestSecurityJSONPayloadDeadLettered(t *testing.T) {
	nest := func(n int) string { return strings.Repeat("[", n) + strings.Repeat("]", n) }
	hs := newHookStore(t)
	rec := newDoneRec()
	w := NewWriter(hs, NewDecoder(DefaultLimits), Config{}, nil, discardLogger())
	startWriter(t, w)
	msgs := []struct{ name, topic, payload, reason string }{
		{"good state", "sensors/dev/state", `{"state":{"fw":"1.0"}}`, ""},
		{"5000 levels", "sensors/dev/state", `{"state":{"deep":` + nest(5000) + `}}`, "nested deeper than 32 levels"},
		{"33 levels", "sensors/dev/state", `{"state":{"deep":` + nest(31) + `}}`, "nested deeper than 32 levels"},
		{"1e400 state", "sensors/dev/state", `{"state":{"big":1e400}}`, "not a finite float64"},
		{"nested 1e400", "sensors/dev/state", `{"state":{"big":{"a":[1e400]}}}`, "not a finite float64"},
		{"invalid UTF-8 value", "sensors/dev/state", "{\"state\":{\"name\":\"\xff\xfe\"}}", "invalid UTF-8"},
		{"invalid UTF-8 key", "sensors/dev/state", "{\"state\":{\"\xc3\x28\":1}}", "invalid UTF-8"},
		{"unpaired surrogate", "sensors/dev/state", `{"state":{"name":"\udead"}}`, "unpaired surrogate"},
		{"invalid UTF-8 id", "sensors/dev/telemetry", "{\"id\":\"m\xff\",\"metrics\":{\"t\":1}}", "invalid UTF-8"},
		{"1e400 metric", "sensors/dev/telemetry", `{"id":"m2","metrics":{"t":1e400}}`, "not a finite float64"},
	}
	for _, m := range msgs {
		submit(t, w, rec.msg(m.name, m.topic, m.payload))
	}
	rec.wait(t, len(msgs))
	dls, err := hs.DeadLetters(0, 100)
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, m := range msgs {
		if m.reason != "" {
			want = append(want, m.reason)
		}
	}
	if len(dls) != len(want) {
		t.Fatalf("%d dead letters, want %d: %+v", len(dls), len(want), dls)
	}
	for i, dl := range dls {
		if !strings.Contains(dl.Reason, want[i]) {
			t.Errorf("dead letter %d: reason %q, want %q", i, dl.Reason, want[i])
		}
	}
	d, err := hs.Device("dev")
	if err != nil {
		t.Fatal(err)
	}
	if len(d.Reported) != 1 || string(d.Reported["fw"].Value) != `"1.0"` {
		t.Fatalf("reported state %v, want only fw", d.Reported)
	}
	if c := hs.Counts(); c.Readings != 0 {
		t.Fatalf("%d readings stored, want 0", c.Readings)
	}
	// What is stored is what the API serves: it passes the rules.
	b, err := json.Marshal(d.Reported.State())
	if err != nil {
		t.Fatal(err)
	}
	if err := wire.CheckJSON(b, wire.MaxJSONDepth); err != nil {
		t.Fatalf("stored state breaks the JSON rules: %v", err)
	}
}

// A state payload at the depth limit is still accepted: the limit is 32
// levels for the whole payload.
func TestDecodeDepthLimit(t *testing.T) {
	dec := NewDecoder(DefaultLimits)
	nest := func(n int) string { return strings.Repeat("[", n) + strings.Repeat("]", n) }
	if _, err := dec.Decode("sensors/d/state", []byte(`{"state":{"v":`+nest(30)+`}}`), testNow); err != nil {
		t.Fatalf("32 levels refused: %v", err)
	}
	if _, err := dec.Decode("sensors/d/state", []byte(`{"state":{"v":`+nest(31)+`}}`), testNow); err == nil {
		t.Fatal("33 levels accepted")
	}
}

// benchTelemetry is a typical sensor message: a timestamp, an id and five
// metrics.
const benchTelemetry = `{"ts":1732170000123,"id":"msg-000123","metrics":{"temperature":21.5,"humidity":48.25,"pressure":1013.2,"battery":3.71,"rssi":-67}}`

// BenchmarkDecodeTelemetry is the ingest hot path's cost per message.
func BenchmarkDecodeTelemetry(b *testing.B) {
	dec := NewDecoder(DefaultLimits)
	p := []byte(benchTelemetry)
	b.SetBytes(int64(len(p)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := dec.Decode("sensors/dev-1/telemetry", p, testNow); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecodeState is the same for a small state message.
func BenchmarkDecodeState(b *testing.B) {
	dec := NewDecoder(DefaultLimits)
	p := []byte(`{"ts":1732170000123,"state":{"fw":"1.4.2","mode":"eco","setpoint":21.5,"leds":[1,0,1]}}`)
	b.SetBytes(int64(len(p)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := dec.Decode("sensors/dev-1/state", p, testNow); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecodeBench is the payload edgebench publishes: an id, a device
// timestamp and two metrics.
func BenchmarkDecodeBench(b *testing.B) {
	dec := NewDecoder(DefaultLimits)
	p := []byte(`{"ts":1732170000123,"id":"dev12-34567","metrics":{"temp":21.5,"hum":44}}`)
	b.SetBytes(int64(len(p)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := dec.Decode("sensors/dev-12/telemetry", p, testNow); err != nil {
			b.Fatal(err)
		}
	}
}
