package store

import (
	"encoding/binary"
	"encoding/json"
	"hash/fnv"
	"math"
	"testing"
)

// The reading key's hash is on disk: dedupe of a redelivery after an
// upgrade depends on the inlined FNV-1a being hash/fnv's.
func TestReadingKeyMatchesHashFNV(t *testing.T) {
	for _, r := range []Reading{
		{TS: t0, ID: "msg-1"},
		{TS: t0, ID: "ü ☃ long id with spaces"},
		{TS: t0 + 5, Metrics: []Metric{{"temp", 21.5}, {"hum", 40}}},
		{TS: t0, Metrics: []Metric{{"x", math.Copysign(0, -1)}}},
	} {
		enc := appendMetrics(nil, r.Metrics)
		h := fnv.New64a()
		if r.ID != "" {
			h.Write([]byte("i" + r.ID))
		} else {
			h.Write(append([]byte("m"), enc...))
		}
		k := readingKey(&r, enc)
		if got, want := binary.BigEndian.Uint64(k[8:]), h.Sum64(); got != want {
			t.Errorf("reading %+v: key hash %x, hash/fnv %x", r, got, want)
		}
		if keyTS(k[:]) != r.TS {
			t.Errorf("reading %+v: key ts %d", r, keyTS(k[:]))
		}
	}
}

// Ingest keeps the records of devices it wrote decoded between batches; a
// record another writer changed in between must be read again, not
// overwritten with the cached copy, and state merged into a cached device
// must not leak into the cache before its transaction commits.
func TestIngestDeviceCacheSeesOtherWriters(t *testing.T) {
	s := openTestStore(t, "", Options{NoSync: true})
	reading := func(n int) Item {
		return Item{Device: "d1", ReceivedAt: t0 + int64(n), Readings: []Reading{{TS: t0 + int64(n), Metrics: []Metric{{"temp", float64(n)}}}}}
	}
	mustIngest(t, s, reading(1))
	mustIngest(t, s, reading(2)) // from the cache from here on
	if _, err := s.SetDesired("d1", map[string]json.RawMessage{"mode": json.RawMessage(`"eco"`)}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.SetMeta("d1", DeviceMeta{Region: "north", Owners: []string{"o1"}}); err != nil {
		t.Fatal(err)
	}
	mustIngest(t, s, reading(3))
	d, err := s.Device("d1")
	if err != nil {
		t.Fatal(err)
	}
	if string(d.Desired.State()["mode"]) != `"eco"` || d.Meta.Region != "north" || d.LastSeen != t0+3 {
		t.Fatalf("device after ingest over another writer's change: desired %v, meta %+v, last_seen %d", d.Desired.State(), d.Meta, d.LastSeen)
	}

	// A batch that fails rolls back: its merged state must not show up in
	// the next batch through the cache.
	state := func(v string) Item {
		return Item{Device: "d1", ReceivedAt: t0 + 10, State: map[string]json.RawMessage{"fw": json.RawMessage(v)}}
	}
	// (bbolt refuses the empty bucket name of the second item.)
	if _, err := s.Ingest([]Item{state(`"1.0"`), {Device: "", Readings: []Reading{{TS: t0, Metrics: []Metric{{"temp", 1}}}}}}, nil); err == nil {
		t.Fatal("a batch with an empty device id committed")
	}
	mustIngest(t, s, reading(4))
	d, err = s.Device("d1")
	if err != nil {
		t.Fatal(err)
	}
	if fw, ok := d.Reported.State()["fw"]; ok {
		t.Fatalf("state of a rolled-back batch stored: fw %s", fw)
	}
	mustIngest(t, s, state(`"2.0"`), reading(5))
	mustIngest(t, s, reading(6))
	d, err = s.Device("d1")
	if err != nil {
		t.Fatal(err)
	}
	if got := string(d.Reported.State()["fw"]); got != `"2.0"` {
		t.Fatalf("reported fw %s, want \"2.0\"", got)
	}
	if string(d.Desired.State()["mode"]) != `"eco"` || d.LastSeen != t0+10 {
		t.Fatalf("device: desired %v, last_seen %d", d.Desired.State(), d.LastSeen)
	}
}
