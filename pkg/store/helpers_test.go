package store

import (
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"testing"
)

// t0 is a minute- and hour-unaligned base time in the test data's range.
const t0 = int64(1732170000123)

func openTestStore(t *testing.T, path string, opts Options) *Store {
	t.Helper()
	if path == "" {
		path = filepath.Join(t.TempDir(), "edge.db")
	}
	s, err := Open(path, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// reopen closes s and opens its file again with the same options.
func reopen(t *testing.T, s *Store) *Store {
	t.Helper()
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	return openTestStore(t, s.Path(), s.opts)
}

func mustIngest(t *testing.T, s *Store, items ...Item) []ItemResult {
	t.Helper()
	res, err := s.Ingest(items, nil)
	if err != nil {
		t.Fatalf("Ingest: %v", err)
	}
	return res
}

func reading(ts int64, id string, kv ...any) Reading {
	r := Reading{TS: ts, ID: id}
	for i := 0; i < len(kv); i += 2 {
		r.Metrics = append(r.Metrics, Metric{Name: kv[i].(string), Value: kv[i+1].(float64)})
	}
	return r
}

func item(dev string, rs ...Reading) Item {
	return Item{Device: dev, ReceivedAt: t0, Readings: rs}
}

// allReadings pages through a device's whole history.
func allReadings(t *testing.T, s *Store, dev string, q ReadingsQuery) []Reading {
	t.Helper()
	var out []Reading
	for {
		p, err := s.Readings(dev, q)
		if err != nil {
			t.Fatalf("Readings(%s, %+v): %v", dev, q, err)
		}
		out = append(out, p.Items...)
		if p.Next == "" {
			return out
		}
		q.Cursor = p.Next
	}
}

func key(r Reading) string { return fmt.Sprintf("%d/%s/%v", r.TS, r.ID, r.Metrics) }

// randomReadings makes n readings with unique ids spread over span ms after
// base, each with metric "a" and, for about half, metric "b".
func randomReadings(rng *rand.Rand, n int, base, span int64) []Reading {
	out := make([]Reading, n)
	for i := range out {
		r := reading(base+rng.Int64N(span), fmt.Sprintf("r%d-%d", base, i), "a", float64(rng.IntN(2000)-1000)/8)
		if rng.IntN(2) == 0 {
			r.Metrics = append(r.Metrics, Metric{Name: "b", Value: rng.NormFloat64()})
		}
		out[i] = r
	}
	return out
}
