package store

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/shadow"
)

var writeSeeds = flag.Bool("write-seeds", false, "rewrite the seed corpora in testdata/fuzz from the encoders")

// seedReadingValues are reading values as the writer stores them.
func seedReadingValues() map[string][]byte {
	rs := map[string]Reading{
		"plain":    {TS: 1732170000123, ID: "m-1", Metrics: []Metric{{"temp", 21.5}, {"hum", 40}}},
		"no-id":    {TS: 1732170000124, Metrics: []Metric{{"v", math.Copysign(0, -1)}}},
		"special":  {TS: -1, ID: "x", Metrics: []Metric{{"nan", math.NaN()}, {"inf", math.Inf(1)}}},
		"no-value": {TS: 0},
	}
	out := make(map[string][]byte, len(rs))
	for i, name := range slices.Sorted(maps.Keys(rs)) {
		r := rs[name]
		out[name] = encodeReadingValue(nil, uint64(i)<<40|7, r.ID, appendMetrics(nil, r.Metrics))
	}
	return out
}

// seedChanges are outbox entries as appendOutbox stores them.
func seedChanges(t testing.TB) map[string][]byte {
	t.Helper()
	doc := shadow.Doc{"fw": {Value: json.RawMessage(`"1.2"`), Stamp: hlc.Timestamp(1 << 20)},
		"gone": {Stamp: hlc.Timestamp(1<<20 + 1), Deleted: true}}
	cs := map[string]*Change{
		"readings": {Kind: ChangeReadings, Device: "d1", Stamp: 5, Readings: []Reading{
			{TS: 1732170000123, ID: "m-1", Metrics: []Metric{{"temp", 21.5}}}, {TS: 7, Metrics: []Metric{{"a", 1}, {"b", 2}}}}},
		"reported": {Kind: ChangeReported, Device: "d1", Stamp: 6, Doc: doc},
		"desired":  {Kind: ChangeDesired, Device: "d1", Stamp: 7, Doc: doc},
		"meta":     {Kind: ChangeMeta, Device: "d1", Stamp: 8, Meta: &DeviceMeta{Owners: []string{"o1"}, Region: "eu", Tags: map[string]string{"a": "z"}, Stamp: 8}},
		"user":     {Kind: ChangeUser, Device: "u1", Stamp: 9, User: &User{OpenID: "u1", Roles: []string{"admin"}, Regions: []string{"eu"}, Stamp: 9}},
	}
	out := make(map[string][]byte, len(cs))
	for name, c := range cs {
		b, err := encodeChange(c)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		out[name] = b
	}
	return out
}

// TestWriteFuzzSeeds rewrites the checked-in seed corpora when run with
// -write-seeds (after a change to an encoding); otherwise it checks that
// every seed is there and current.
func TestWriteFuzzSeeds(t *testing.T) {
	corpora := map[string]map[string][]byte{
		"FuzzReadingValue": seedReadingValues(),
		"FuzzOutboxChange": seedChanges(t),
	}
	for target, seeds := range corpora {
		dir := filepath.Join("testdata", "fuzz", target)
		for name, b := range seeds {
			path := filepath.Join(dir, "seed-"+name)
			want := fmt.Appendf(nil, "go test fuzz v1\n[]byte(%q)\n", b)
			if *writeSeeds {
				if err := os.MkdirAll(dir, 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, want, 0o644); err != nil {
					t.Fatal(err)
				}
				continue
			}
			if got, err := os.ReadFile(path); err != nil || !bytes.Equal(got, want) {
				t.Errorf("%s is missing or stale (%v): run go test -run TestWriteFuzzSeeds -write-seeds", path, err)
			}
		}
	}
}

// FuzzReadingValue decodes arbitrary stored reading values: never a panic,
// and what decodes encodes back to the same reading.
func FuzzReadingValue(f *testing.F) {
	for _, b := range seedReadingValues() {
		f.Add(b)
	}
	key := readingKey(&Reading{TS: 1732170000123}, nil)
	f.Fuzz(func(t *testing.T, v []byte) {
		r, seq, err := decodeReadingValue(key[:], v)
		if err != nil {
			return
		}
		v2 := encodeReadingValue(nil, seq, r.ID, appendMetrics(nil, r.Metrics))
		r2, seq2, err := decodeReadingValue(key[:], v2)
		if err != nil {
			t.Fatalf("re-encoded value %q does not decode: %v", v2, err)
		}
		if a, b := renderReadings(r), renderReadings(r2); a != b || seq != seq2 {
			t.Fatalf("round trip changed the value:\nbefore %d %s\nafter  %d %s", seq, a, seq2, b)
		}
		if got := readingSeq(v); got != seq {
			t.Fatalf("readingSeq = %d, decode says %d", got, seq)
		}
	})
}

// FuzzOutboxChange decodes arbitrary outbox entries: never a panic, and what
// decodes encodes back to the same change, stably.
func FuzzOutboxChange(f *testing.F) {
	for _, b := range seedChanges(f) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		c, err := decodeChange(1, b)
		if err != nil {
			return
		}
		b1, err := encodeChange(&c)
		if err != nil {
			t.Fatalf("decoded change does not encode: %v", err)
		}
		c2, err := decodeChange(1, b1)
		if err != nil {
			t.Fatalf("re-encoded change %q does not decode: %v", b1, err)
		}
		if a, b := renderChange(t, c), renderChange(t, c2); a != b {
			t.Fatalf("round trip changed the change:\nbefore %s\nafter  %s", a, b)
		}
		if b2, _ := encodeChange(&c2); !bytes.Equal(b1, b2) {
			t.Fatalf("encoding is not stable:\n%q\n%q", b1, b2)
		}
	})
}

// renderReadings prints readings with metric values as bits, so NaN equals
// itself.
func renderReadings(rs ...Reading) string {
	var b bytes.Buffer
	for _, r := range rs {
		fmt.Fprintf(&b, "%d %q", r.TS, r.ID)
		for _, m := range r.Metrics {
			fmt.Fprintf(&b, " %q=%x", m.Name, math.Float64bits(m.Value))
		}
		b.WriteByte('\n')
	}
	return b.String()
}

// renderChange prints a change for comparison; JSON payloads re-marshalled
// (which compacts raw values).
func renderChange(t *testing.T, c Change) string {
	t.Helper()
	j, err := json.Marshal(struct {
		Doc  shadow.Doc
		Meta *DeviceMeta
		User *User
	}{c.Doc, c.Meta, c.User})
	if err != nil {
		t.Fatalf("marshal decoded change: %v", err)
	}
	return fmt.Sprintf("%d %d %d %q\n%s%s", c.Seq, c.Kind, c.Stamp, c.Device, renderReadings(c.Readings...), j)
}
