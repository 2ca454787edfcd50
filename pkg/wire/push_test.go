package wire_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"reflect"
	"sort"
	"strings"
	"testing"

	gojson "github.com/goccy/go-json"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/shadow"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// oddNames are metric names an encoder must escape, or get wrong.
var oddNames = []string{
	"t", "hum", "a\"b", `back\slash`, "tab\there", "nl\n", "\x00nul", "\x1f", "<html>&", "é", "日本",
	"\u2028line", "emoji😀", "\xffbad", "a/b", " space ", strings.Repeat("x", 128),
}

// oddFloats are values whose formatting differs between encoders, or
// between forms of one encoder.
var oddFloats = []float64{
	0, math.Copysign(0, -1), 1, -1, 21.5, 0.1, 1e-6, 9.99e-7, 1e-7, 1e20, 1e21, 123456789012345678901234.0,
	math.MaxFloat64, -math.MaxFloat64, math.SmallestNonzeroFloat64, 5e-324, 2.2250738585072014e-308,
	1.0 / 3, 100, 1e100, -1e-100, 4503599627370497, 0.000001234,
}

// randomBatch is a push the way an edge makes one: readings changes with
// the metrics in Sorted (sorted; the syncer's form) or in Metrics (maps;
// older callers), now and then a state change between them.
func randomBatch(rng *rand.Rand, sorted bool) *wire.PushBatch {
	b := &wire.PushBatch{Edge: "edge-1", FirstSeq: 1 + rng.Uint64N(1<<40)}
	for range 1 + rng.IntN(6) {
		if rng.IntN(5) == 0 {
			b.Changes = append(b.Changes, wire.Change{Kind: wire.KindReported, Device: "d1",
				Doc: shadow.Doc{"mode": {Value: json.RawMessage(`"eco"`), Stamp: hlc.Timestamp(1 + rng.Uint64N(1<<50))}}})
			continue
		}
		c := wire.Change{Kind: wire.KindReadings, Device: fmt.Sprintf("dev-%d", rng.IntN(100))}
		for range 1 + rng.IntN(20) {
			r := wire.Reading{TS: 1 + rng.Int64N(1<<45)}
			if rng.IntN(2) == 0 {
				r.ID = oddNames[rng.IntN(len(oddNames))] + fmt.Sprint(rng.Int())
			}
			m := map[string]float64{}
			for range 1 + rng.IntN(5) {
				v := oddFloats[rng.IntN(len(oddFloats))]
				if rng.IntN(3) == 0 {
					v = rng.NormFloat64() * math.Pow(10, float64(rng.IntN(60)-30))
				}
				m[oddNames[rng.IntN(len(oddNames))]] = v
			}
			if sorted {
				for k, v := range m {
					r.Sorted = append(r.Sorted, wire.Metric{Name: k, Value: v})
				}
				r.Sorted, _ = wire.SortMetrics(r.Sorted)
			} else {
				r.Metrics = m
			}
			c.Readings = append(c.Readings, r)
		}
		b.Changes = append(b.Changes, c)
	}
	return b
}

// asMaps is b with every reading's metrics in Metrics: what json.Marshal
// and the general decoder know.
func asMaps(b *wire.PushBatch) *wire.PushBatch {
	out := *b
	out.Changes = make([]wire.Change, len(b.Changes))
	for i, c := range b.Changes {
		if c.Readings != nil {
			rs := make([]wire.Reading, len(c.Readings))
			for j, r := range c.Readings {
				if r.Sorted != nil {
					r.Metrics = make(map[string]float64, len(r.Sorted))
					for _, m := range r.Sorted {
						r.Metrics[m.Name] = m.Value
					}
					r.Sorted = nil
				}
				rs[j] = r
			}
			c.Readings = rs
		}
		out.Changes[i] = c
	}
	return &out
}

// generic decodes a JSON text keeping numbers as their text.
func generic(t *testing.T, b []byte) any {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		t.Fatalf("decode %.200s: %v", b, err)
	}
	return v
}

// TestAppendPushBatchMatchesMarshal: for random batches, with odd names
// and odd floats, the push codec's JSON is json.Marshal's: the same value,
// numbers written the same to the digit.
func TestAppendPushBatchMatchesMarshal(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 500 {
		b := randomBatch(rng, i%2 == 0)
		got, err := wire.AppendPushBatch(nil, b)
		if err != nil {
			t.Fatal(err)
		}
		want, err := json.Marshal(asMaps(b))
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(generic(t, got), generic(t, want)) {
			t.Fatalf("batch %d:\n got %.400s\nwant %.400s", i, got, want)
		}
		if err := wire.CheckJSON(got, wire.MaxSyncJSONDepth); err != nil {
			t.Fatalf("batch %d breaks the JSON rules: %v", i, err)
		}
	}
}

func TestAppendPushBatchRefusesNonFinite(t *testing.T) {
	for _, v := range []float64{math.NaN(), math.Inf(1), math.Inf(-1)} {
		for _, sorted := range []bool{false, true} {
			r := wire.Reading{TS: 1, Metrics: map[string]float64{"t": v}}
			if sorted {
				r = wire.Reading{TS: 1, Sorted: []wire.Metric{{Name: "t", Value: v}}}
			}
			b := &wire.PushBatch{Edge: "e", FirstSeq: 1, Changes: []wire.Change{{Kind: wire.KindReadings, Device: "d", Readings: []wire.Reading{r}}}}
			if _, err := json.Marshal(asMaps(b)); err == nil {
				t.Fatal("json.Marshal took a non-finite metric")
			}
			if _, err := wire.AppendPushBatch(nil, b); !errors.Is(err, wire.ErrInvalid) {
				t.Fatalf("%v (sorted %v): err %v, want ErrInvalid", v, sorted, err)
			}
		}
	}
}

// generalDecode is the cloud's decode of a push body before the fast path
// (httpapi's decodeJSON): the JSON rules, then goccy strictly.
func generalDecode(body []byte) (*wire.PushBatch, error) {
	if len(bytes.TrimSpace(body)) == 0 {
		return nil, errors.New("empty")
	}
	if err := wire.CheckJSON(body, wire.MaxSyncJSONDepth); err != nil {
		return nil, err
	}
	var b wire.PushBatch
	dec := gojson.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&b); err != nil {
		return nil, err
	}
	if dec.More() {
		return nil, errors.New("trailing data")
	}
	return &b, nil
}

// goccyChange is what the cloud hands DecodePushBatch for other changes.
func goccyChange(raw []byte, c *wire.Change) error {
	dec := gojson.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	return dec.Decode(c)
}

// checkSameDecode fails unless DecodePushBatch, when it takes body,
// decodes it to what the general decoder does, with the same digests and
// the same validity.
func checkSameDecode(t *testing.T, body []byte) (taken bool) {
	t.Helper()
	var fast wire.PushBatch
	if !wire.DecodePushBatch(body, &fast, goccyChange) {
		return false
	}
	slow, err := generalDecode(body)
	if err != nil {
		t.Fatalf("fast path took what the general decoder refuses (%v): %.300q", err, body)
	}
	if !reflect.DeepEqual(asMaps(&fast), slow) {
		t.Fatalf("decoders differ on %.300q:\nfast %+v\nslow %+v", body, asMaps(&fast), slow)
	}
	if len(fast.Changes) != len(slow.Changes) {
		t.Fatal("change counts differ")
	}
	for i := range fast.Changes {
		if a, b := fast.Changes[i].Digest(), slow.Changes[i].Digest(); a != b {
			t.Fatalf("change %d: digest %x, general decode's %x", i, a, b)
		}
	}
	if ef, es := fast.Validate(), slow.Validate(); (ef == nil) != (es == nil) {
		t.Fatalf("validation differs: fast %v, general %v", ef, es)
	}
	return true
}

// TestDecodePushBatchTakesWhatEdgesSend: what a Go edge writes takes the
// fast path and decodes to the batch it wrote.
func TestDecodePushBatchTakesWhatEdgesSend(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range 300 {
		b := randomBatch(rng, i%2 == 0)
		body, err := wire.AppendPushBatch(nil, b)
		if err != nil {
			t.Fatal(err)
		}
		if !checkSameDecode(t, body) {
			t.Fatalf("batch %d declined: %.300s", i, body)
		}
		var got wire.PushBatch
		wire.DecodePushBatch(body, &got, goccyChange)
		// A readings change with an escape in a string (odd names and
		// invalid UTF-8) is left to the general decoder; the rest must
		// take the fast path.
		for j := range got.Changes {
			c := &got.Changes[j]
			if c.Kind != wire.KindReadings {
				continue
			}
			plain, _ := wire.AppendPushBatch(nil, &wire.PushBatch{Changes: []wire.Change{b.Changes[j]}})
			if !bytes.Contains(plain, []byte(`\`)) && c.Readings[0].Sorted == nil {
				t.Fatalf("batch %d change %d: readings without escapes took the general path: %s", i, j, plain)
			}
		}
		// It reads back as json.Marshal's body did (which writes invalid
		// UTF-8 as U+FFFD), to the bit.
		marshalled, err := json.Marshal(asMaps(b))
		if err != nil {
			t.Fatal(err)
		}
		// An older edge's body (json.Marshal of maps) takes the fast path
		// as well.
		var older wire.PushBatch
		if !checkSameDecode(t, marshalled) || !wire.DecodePushBatch(marshalled, &older, goccyChange) {
			t.Fatalf("batch %d: an older edge's body declined", i)
		}
		for j := range older.Changes {
			one, _ := json.Marshal(asMaps(&wire.PushBatch{Changes: []wire.Change{b.Changes[j]}}))
			if c := &older.Changes[j]; c.Kind == wire.KindReadings && !bytes.Contains(one, []byte(`\`)) && c.Readings[0].Sorted == nil {
				t.Fatalf("batch %d change %d: an older edge's readings took the general path", i, j)
			}
		}
		old, err := generalDecode(marshalled)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(asMaps(&got), old) {
			t.Fatalf("batch %d does not read back", i)
		}
		for j := range b.Changes {
			for k := range got.Changes[j].Readings {
				for m, mt := range got.Changes[j].Readings[k].Sorted {
					want := old.Changes[j].Readings[k].Metrics[mt.Name]
					if math.Float64bits(mt.Value) != math.Float64bits(want) {
						t.Fatalf("batch %d change %d reading %d metric %d: %v, want %v", i, j, k, m, mt.Value, want)
					}
				}
			}
		}
	}
}

// TestDecodePushBatchDeclines: each body is one the fast path leaves to
// the general decoder, which keeps its answer (the last of a metric named
// twice wins; a refusal keeps its message).
func TestDecodePushBatchDeclines(t *testing.T) {
	wrap := func(readings string) string {
		return `{"edge":"e","first_seq":1,"changes":[{"kind":"readings","device":"d","readings":[` + readings + `]}]}`
	}
	for name, body := range map[string]string{
		"metric twice":     wrap(`{"ts":1,"metrics":{"t":1,"t":2}}`),
		"escaped name":     wrap(`{"ts":1,"metrics":{"\u0074":1}}`),
		"null metrics":     wrap(`{"ts":1,"metrics":null}`),
		"empty metrics":    wrap(`{"ts":1,"metrics":{}}`),
		"float ts":         wrap(`{"ts":1.0,"metrics":{"t":1}}`),
		"exponent ts":      wrap(`{"ts":1e3,"metrics":{"t":1}}`),
		"minus zero ts":    wrap(`{"ts":-0,"metrics":{"t":1}}`),
		"huge ts":          wrap(`{"ts":9223372036854775808,"metrics":{"t":1}}`),
		"string metric":    wrap(`{"ts":1,"metrics":{"t":"1"}}`),
		"1e400":            wrap(`{"ts":1,"metrics":{"t":1e400}}`),
		"unknown key":      wrap(`{"ts":1,"metrics":{"t":1},"x":1}`),
		"capital key":      wrap(`{"TS":1,"metrics":{"t":1}}`),
		"ts twice":         wrap(`{"ts":1,"ts":2,"metrics":{"t":1}}`),
		"no readings":      wrap(``),
		"trailing":         wrap(`{"ts":1,"metrics":{"t":1}}`) + `x`,
		"second object":    wrap(`{"ts":1,"metrics":{"t":1}}`) + `{}`,
		"edge twice":       `{"edge":"e","edge":"f","first_seq":1,"changes":[]}`,
		"no changes":       `{"edge":"e","first_seq":1,"changes":[]}`,
		"null changes":     `{"edge":"e","first_seq":1,"changes":null}`,
		"no first_seq":     `{"edge":"e","changes":[{"kind":"readings","device":"d","readings":[{"ts":1,"metrics":{"t":1}}]}]}`,
		"negative seq":     `{"edge":"e","first_seq":-1,"changes":[]}`,
		"invalid UTF-8":    wrap("{\"ts\":1,\"metrics\":{\"\xff\":1}}"),
		"not an object":    `[]`,
		"unknown change":   `{"edge":"e","first_seq":1,"changes":[{"kind":"readings","device":"d","readings":[{"ts":1,"metrics":{"t":1}}],"bogus":1}]}`,
		"bad other change": `{"edge":"e","first_seq":1,"changes":[{"kind":"reported","device":"d","doc":{"f":{"v":1e400}}}]}`,
	} {
		t.Run(name, func(t *testing.T) {
			// Without a decoder for other changes, a change the fast path
			// does not take declines the batch.
			var b wire.PushBatch
			if wire.DecodePushBatch([]byte(body), &b, nil) {
				t.Fatalf("taken: %s", body)
			}
			// With one, the batch decodes as the general decoder does.
			checkSameDecode(t, []byte(body))
		})
	}
	// A metric named twice: the last value wins, as before the fast path.
	var b wire.PushBatch
	if !wire.DecodePushBatch([]byte(wrap(`{"ts":1,"metrics":{"t":1,"t":2}}`)), &b, goccyChange) || b.Changes[0].Readings[0].Metrics["t"] != 2 {
		t.Fatalf("a metric named twice: %+v", b)
	}
}

// TestDecodePushBatchLimits: the fast path stops buffering at the limits
// (the general decoder and Validate then refuse the batch as before).
func TestDecodePushBatchLimits(t *testing.T) {
	body := func(changes, readings, metrics int) []byte {
		b := []byte(`{"edge":"e","first_seq":1,"changes":[`)
		for c := range changes {
			if c > 0 {
				b = append(b, ',')
			}
			b = append(b, `{"kind":"readings","device":"d","readings":[`...)
			for r := range readings {
				if r > 0 {
					b = append(b, ',')
				}
				b = append(b, `{"ts":1,"metrics":{`...)
				for m := range metrics {
					if m > 0 {
						b = append(b, ',')
					}
					b = fmt.Appendf(b, `"m%03d":1`, m)
				}
				b = append(b, "}}"...)
			}
			b = append(b, "]}"...)
		}
		return append(b, "]}"...)
	}
	for _, tc := range []struct {
		name                       string
		changes, readings, metrics int
		taken                      bool
	}{
		{"readings at the limit", 4, wire.MaxReadingsTotal / 4, 1, true},
		{"one reading more", 4, wire.MaxReadingsTotal/4 + 1, 1, false},
		{"metrics at the limit", 1, 1, wire.MaxMetrics, true},
		{"one metric more", 1, 1, wire.MaxMetrics + 1, false},
	} {
		var b wire.PushBatch
		if got := wire.DecodePushBatch(body(tc.changes, tc.readings, tc.metrics), &b, nil); got != tc.taken {
			t.Errorf("%s: taken %v, want %v", tc.name, got, tc.taken)
		}
	}
}

// TestDecodePushBatchOtherChanges: changes of other kinds go through the
// caller's decoder in place, between readings changes.
func TestDecodePushBatchOtherChanges(t *testing.T) {
	body := []byte(`{"edge":"e","first_seq":7,"changes":[
		{"kind":"readings","device":"d","readings":[{"ts":1,"id":"m1","metrics":{"b":2,"a":1}}]},
		{"kind":"reported","device":"d","doc":{"mode":{"v":"eco","t":"1764650000000.1"}}},
		{"device":"d","kind":"readings","readings":[{"metrics":{"t":-0},"ts":2}],"actor":"","proof":""}
	]}`)
	if !checkSameDecode(t, body) {
		t.Fatal("declined")
	}
	var b wire.PushBatch
	wire.DecodePushBatch(body, &b, goccyChange)
	if got := b.Changes[0].Readings[0].Sorted; !reflect.DeepEqual(got, []wire.Metric{{Name: "a", Value: 1}, {Name: "b", Value: 2}}) {
		t.Fatalf("metrics %v, want sorted", got)
	}
	if b.Changes[1].Kind != wire.KindReported || b.Changes[1].Doc == nil {
		t.Fatalf("other change %+v", b.Changes[1])
	}
	if v := b.Changes[2].Readings[0].Sorted[0].Value; !math.Signbit(v) {
		t.Fatal("negative zero lost its sign")
	}
	var none wire.PushBatch
	if wire.DecodePushBatch(body, &none, nil) {
		t.Fatal("taken without a decoder for other changes")
	}
}

// digestV1 is wire.Change.Digest as it was written before the push codec:
// the reference the digests persisted in edge_seq chains were made with.
func digestV1(c *wire.Change) wire.Digest {
	b := make([]byte, 0, 256)
	str := func(s string) {
		b = binary.AppendUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	str(c.Kind)
	str(c.Device)
	str(c.Actor)
	str(c.Proof)
	b = binary.AppendUvarint(b, uint64(len(c.Readings)))
	var names []string
	for i := range c.Readings {
		r := &c.Readings[i]
		b = binary.AppendVarint(b, r.TS)
		str(r.ID)
		names = names[:0]
		for k := range r.Metrics {
			names = append(names, k)
		}
		sort.Strings(names)
		b = binary.AppendUvarint(b, uint64(len(names)))
		for _, k := range names {
			str(k)
			b = binary.LittleEndian.AppendUint64(b, math.Float64bits(r.Metrics[k]))
		}
	}
	names = names[:0]
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
	// Meta and user: none in these changes.
	b = append(b, 0, 0)
	sum := sha256.Sum256(b)
	var d wire.Digest
	copy(d[:], sum[:])
	return d
}

// TestDigestOfSortedMetrics: a change's digest is the one it always had,
// whichever form its metrics are in.
func TestDigestOfSortedMetrics(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for range 300 {
		sorted := randomBatch(rng, true)
		maps := asMaps(sorted)
		for i := range sorted.Changes {
			want := digestV1(&maps.Changes[i])
			if got := maps.Changes[i].Digest(); got != want {
				t.Fatalf("map form: digest %x, want %x", got, want)
			}
			if got := sorted.Changes[i].Digest(); got != want {
				t.Fatalf("sorted form: digest %x, want %x", got, want)
			}
		}
	}
}

func TestValidateSorted(t *testing.T) {
	one := func(ms ...wire.Metric) error {
		r := wire.Reading{TS: 1, Sorted: ms}
		return r.Validate()
	}
	if err := one(wire.Metric{Name: "a", Value: 1}, wire.Metric{Name: "b", Value: 2}); err != nil {
		t.Fatal(err)
	}
	for name, err := range map[string]error{
		"unsorted": one(wire.Metric{Name: "b"}, wire.Metric{Name: "a"}),
		"twice":    one(wire.Metric{Name: "a"}, wire.Metric{Name: "a"}),
		"NaN":      one(wire.Metric{Name: "a", Value: math.NaN()}),
		"no name":  one(wire.Metric{Value: 1}),
		"empty":    one(),
		"both":     (&wire.Reading{TS: 1, Metrics: map[string]float64{"a": 1}, Sorted: []wire.Metric{{Name: "b"}}}).Validate(),
	} {
		if !errors.Is(err, wire.ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
}

// FuzzDecodePushBatch compares the fast push decoder with the cloud's
// general one (the JSON rules, then goccy strictly) on every input: what
// the fast path takes, the general decoder takes, to the same batch, the
// same digests and the same validity. What it declines goes the general
// way, so acceptance and refusal are the general decoder's by
// construction. Seeds in testdata/fuzz/FuzzDecodePushBatch.
func FuzzDecodePushBatch(f *testing.F) {
	rng := rand.New(rand.NewPCG(7, 8))
	for range 8 {
		body, err := wire.AppendPushBatch(nil, randomBatch(rng, true))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(body)
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		checkSameDecode(t, body)
	})
}

// benchBatch is a push as syncbench makes them: 5,000 readings of 100
// devices, each with a ts, an id and two metrics of a sensor's
// resolution (21.5, 40).
func benchBatch() *wire.PushBatch {
	b := &wire.PushBatch{Edge: "edge-1", FirstSeq: 1}
	for d := range 100 {
		c := wire.Change{Kind: wire.KindReadings, Device: fmt.Sprintf("dev-%03d", d)}
		for i := range 50 {
			c.Readings = append(c.Readings, wire.Reading{TS: 1764650000000 + int64(i), ID: fmt.Sprintf("m-%d-%d", d, i),
				Sorted: []wire.Metric{{Name: "hum", Value: float64(i % 100)}, {Name: "temp", Value: float64(i%40) + 0.5}}})
		}
		b.Changes = append(b.Changes, c)
	}
	return b
}

const benchReadings = 5000

func reportPerReading(b *testing.B) {
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/benchReadings, "ns/reading")
}

// BenchmarkPushEncode: the edge's push body, json.Marshal of maps (what
// the client did) against AppendPushBatch of sorted metrics.
func BenchmarkPushEncode(b *testing.B) {
	sorted := benchBatch()
	maps := asMaps(sorted)
	b.Run("json.Marshal", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := json.Marshal(maps); err != nil {
				b.Fatal(err)
			}
		}
		reportPerReading(b)
	})
	b.Run("AppendPushBatch", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := wire.AppendPushBatch(make([]byte, 0, 64*benchReadings), sorted); err != nil {
				b.Fatal(err)
			}
		}
		reportPerReading(b)
	})
}

// BenchmarkPushDecode: the leader's decode, validation and digests of a
// push body, the general way (goccy into maps) against DecodePushBatch.
func BenchmarkPushDecode(b *testing.B) {
	body, err := wire.AppendPushBatch(nil, benchBatch())
	if err != nil {
		b.Fatal(err)
	}
	check := func(b *testing.B, p *wire.PushBatch) {
		if err := p.Validate(); err != nil {
			b.Fatal(err)
		}
		for i := range p.Changes {
			p.Changes[i].Digest()
		}
	}
	b.Run("general", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			p, err := generalDecode(body)
			if err != nil {
				b.Fatal(err)
			}
			check(b, p)
		}
		reportPerReading(b)
	})
	b.Run("DecodePushBatch", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			var p wire.PushBatch
			if !wire.DecodePushBatch(body, &p, goccyChange) {
				b.Fatal("declined")
			}
			check(b, &p)
		}
		reportPerReading(b)
	})
}
