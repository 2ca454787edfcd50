package store

import (
	"encoding/binary"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// decodeReadingsV1 is the outbox's readings decode before
// decodeOutboxReadings (a string and a slice per reading): the reference.
func decodeReadingsV1(b []byte, n uint64) ([]Reading, error) {
	rs := make([]Reading, 0, n)
	for i := uint64(0); i < n; i++ {
		var r Reading
		ts, w := binary.Varint(b)
		if w <= 0 {
			return nil, errCorrupt
		}
		r.TS = ts
		b = b[w:]
		il, w := binary.Uvarint(b)
		if w <= 0 || uint64(len(b)-w) < il {
			return nil, errCorrupt
		}
		r.ID = string(b[w : w+int(il)])
		b = b[w+int(il):]
		var err error
		if r.Metrics, b, err = readMetrics(b, nil); err != nil {
			return nil, err
		}
		rs = append(rs, r)
	}
	return rs, nil
}

// TestDecodeOutboxReadings: random readings entries, and every truncation
// of them, decode as they did (values to the bit, no metrics as nil,
// corruption as errCorrupt).
func TestDecodeOutboxReadings(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for range 200 {
		c := Change{Seq: 1, Kind: ChangeReadings, Device: "d1", Stamp: 5}
		for range 1 + rng.IntN(30) {
			r := Reading{TS: rng.Int64N(1<<44) - 1<<40}
			if rng.IntN(2) == 0 {
				r.ID = fmt.Sprint("m-", rng.Int())
			}
			for k := range rng.IntN(4) {
				r.Metrics = append(r.Metrics, Metric{Name: fmt.Sprint("m", k, rng.IntN(3)), Value: math.Float64frombits(rng.Uint64())})
			}
			c.Readings = append(c.Readings, r)
		}
		b, err := encodeChange(&c)
		if err != nil {
			t.Fatal(err)
		}
		got, err := decodeChange(1, b)
		if err != nil {
			t.Fatal(err)
		}
		// renderChange shows values as bits, so NaN equals itself.
		if a, w := renderChange(t, got), renderChange(t, c); a != w {
			t.Fatalf("decoded\n%s\nwant\n%s", a, w)
		}
		body := b[9+1+len(c.Device):] // kind, stamp, device
		n, w := binary.Uvarint(body)
		body = body[w:]
		for cut := 0; cut <= len(body); cut++ {
			want, werr := decodeReadingsV1(body[:cut], n)
			got, gerr := decodeOutboxReadings(body[:cut], n)
			if (werr == nil) != (gerr == nil) {
				t.Fatalf("cut %d: err %v, was %v", cut, gerr, werr)
			}
			if werr == nil && renderReadingsOf(t, got) != renderReadingsOf(t, want) {
				t.Fatalf("cut %d: decodes differently", cut)
			}
			for i := range want {
				if (want[i].Metrics == nil) != (got[i].Metrics == nil) {
					t.Fatalf("cut %d reading %d: nil metrics differ", cut, i)
				}
			}
		}
	}
}

func renderReadingsOf(t *testing.T, rs []Reading) string {
	t.Helper()
	return renderChange(t, Change{Kind: ChangeReadings, Readings: rs})
}

// BenchmarkOutboxDecode: a readings entry of 50 readings (ts, id, two
// metrics), decoded as before and as decodeOutboxReadings does.
func BenchmarkOutboxDecode(b *testing.B) {
	c := Change{Kind: ChangeReadings, Device: "dev-001", Stamp: 5}
	for i := range 50 {
		c.Readings = append(c.Readings, Reading{TS: 1764650000000 + int64(i), ID: fmt.Sprint("m-1-", i),
			Metrics: []Metric{{"temp", 21.5}, {"hum", 40 + float64(i)/10}}})
	}
	v, err := encodeChange(&c)
	if err != nil {
		b.Fatal(err)
	}
	body := v[9+1+len(c.Device):]
	n, w := binary.Uvarint(body)
	body = body[w:]
	for name, decode := range map[string]func([]byte, uint64) ([]Reading, error){
		"v1": decodeReadingsV1, "slabs": decodeOutboxReadings,
	} {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := decode(body, n); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/50, "ns/reading")
		})
	}
}
