package syncer

import (
	"encoding/json"
	"fmt"
	"reflect"
	"testing"

	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// toWireMaps is toWire's readings as they were: a map per reading.
func toWireMaps(c *store.Change) wire.Change {
	w := wire.Change{Kind: c.Kind.String(), Device: c.Device, Actor: c.By.OpenID, Proof: c.By.Proof}
	for _, r := range c.Readings {
		m := make(map[string]float64, len(r.Metrics))
		for _, mv := range r.Metrics {
			m[mv.Name] = mv.Value
		}
		w.Readings = append(w.Readings, wire.Reading{TS: r.TS, ID: r.ID, Metrics: m})
	}
	return w
}

func readingsChange(n int) store.Change {
	c := store.Change{Seq: 1, Kind: store.ChangeReadings, Device: "dev-001"}
	for i := range n {
		c.Readings = append(c.Readings, store.Reading{TS: 1764650000000 + int64(i), ID: fmt.Sprint("m-", i),
			Metrics: []store.Metric{{Name: "temp", Value: 21.5}, {Name: "hum", Value: 40 + float64(i)/10}}})
	}
	return c
}

// TestToWireSorted: a readings change goes with sorted metrics, and its
// push body means what the map form's json.Marshal did.
func TestToWireSorted(t *testing.T) {
	c := readingsChange(3)
	c.Readings = append(c.Readings, store.Reading{TS: 9}) // no metrics: "metrics":{} as before
	w := toWire(&c)
	for i, r := range w.Readings[:3] {
		if r.Metrics != nil || len(r.Sorted) != 2 || r.Sorted[0].Name != "hum" {
			t.Fatalf("reading %d: %+v, want sorted metrics", i, r)
		}
	}
	got, err := wire.AppendPushBatch(nil, &wire.PushBatch{Edge: "e", FirstSeq: 1, Changes: []wire.Change{w}})
	if err != nil {
		t.Fatal(err)
	}
	want, err := json.Marshal(&wire.PushBatch{Edge: "e", FirstSeq: 1, Changes: []wire.Change{toWireMaps(&c)}})
	if err != nil {
		t.Fatal(err)
	}
	var a, b any
	if json.Unmarshal(got, &a) != nil || json.Unmarshal(want, &b) != nil || !reflect.DeepEqual(a, b) {
		t.Fatalf("push body\n%s\nwant the meaning of\n%s", got, want)
	}
}

// BenchmarkPushBody: an outbox change of 5,000 readings to its push
// body, as the syncer and client did (maps, json.Marshal) and do.
func BenchmarkPushBody(b *testing.B) {
	c := readingsChange(5000)
	for name, body := range map[string]func() ([]byte, error){
		"maps+json.Marshal": func() ([]byte, error) {
			return json.Marshal(&wire.PushBatch{Edge: "e", FirstSeq: 1, Changes: []wire.Change{toWireMaps(&c)}})
		},
		"sorted+AppendPushBatch": func() ([]byte, error) {
			return wire.AppendPushBatch(nil, &wire.PushBatch{Edge: "e", FirstSeq: 1, Changes: []wire.Change{toWire(&c)}})
		},
	} {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := body(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/5000, "ns/reading")
		})
	}
}
