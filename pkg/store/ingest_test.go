package store

import (
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"
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

// loadDump builds a store file from a dump of every bucket's keys and
// values (testdata/v0-edge.dump: a line with a bucket path of hex names,
// alone for a bucket or with a hex key and value for a pair), so that a
// file in an older layout can be kept as text.
func loadDump(t *testing.T, dump string) string {
	t.Helper()
	raw, err := os.ReadFile(dump)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "edge.db")
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bolt.Tx) error {
		for _, line := range strings.Split(strings.TrimSpace(string(raw)), "\n") {
			f := strings.Fields(line)
			var b *bolt.Bucket
			for i, name := range strings.Split(f[0], "/") {
				n, err := hex.DecodeString(name)
				if err != nil {
					return err
				}
				if i == 0 {
					b, err = tx.CreateBucketIfNotExists(n)
				} else {
					b, err = b.CreateBucketIfNotExists(n)
				}
				if err != nil {
					return err
				}
			}
			if len(f) == 3 {
				k, err1 := hex.DecodeString(f[1])
				v, err2 := hex.DecodeString(f[2])
				if err := errors.Join(err1, err2); err != nil {
					return err
				}
				if err := b.Put(k, v); err != nil {
					return err
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("load %s: %v", dump, err)
	}
	return path
}

// v0Golden is what the edge of 6daae36 read back from the file it wrote
// (testdata/v0-edge.json, written with testdata/v0-edge.dump).
type v0Golden struct {
	Devices  []*Device
	Readings map[string][]Reading
	Outbox   []Change
}

func readV0Golden(t *testing.T) v0Golden {
	t.Helper()
	raw, err := os.ReadFile("testdata/v0-edge.json")
	if err != nil {
		t.Fatal(err)
	}
	var g v0Golden
	if err := json.Unmarshal(raw, &g); err != nil {
		t.Fatal(err)
	}
	return g
}

func allDevices(t *testing.T, s *Store) []*Device {
	t.Helper()
	var out []*Device
	if err := s.Devices("", func(d *Device) bool { out = append(out, d); return true }); err != nil {
		t.Fatal(err)
	}
	return out
}

func jsonOf(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// A file written before last_seen moved out of the device record (it is
// only in the JSON record there, with no device_seen bucket) reads back as
// its edge read it, keeps deduplicating what that edge stored, and keeps
// each device's last_seen from going backwards.
func TestIngestOpensFileWithLastSeenInRecord(t *testing.T) {
	g := readV0Golden(t)
	s := openTestStore(t, loadDump(t, "testdata/v0-edge.dump"), Options{NoSync: true})
	if got, want := jsonOf(t, allDevices(t, s)), jsonOf(t, g.Devices); got != want {
		t.Fatalf("devices of an old file:\n got %s\nwant %s", got, want)
	}
	for dev, want := range g.Readings {
		if got := allReadings(t, s, dev, ReadingsQuery{}); jsonOf(t, got) != jsonOf(t, want) {
			t.Fatalf("readings of %s:\n got %s\nwant %s", dev, jsonOf(t, got), jsonOf(t, want))
		}
	}
	out, err := s.Outbox(0, 1000, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if jsonOf(t, out) != jsonOf(t, g.Outbox) {
		t.Fatalf("outbox:\n got %s\nwant %s", jsonOf(t, out), jsonOf(t, g.Outbox))
	}
	before := s.Counts()

	// Redeliveries of what the old edge stored: by device ts and id
	// (dev-a), by id with a receive-time ts (dev-c), by ts and values
	// (dev-d). dev-a's is received before its recorded last_seen.
	old := g.Readings["dev-c"][0]
	old.TS += 60_000
	old.ReceiveTS = true
	res := mustIngest(t, s,
		Item{Device: "dev-a", ReceivedAt: t0 - 10_000, Readings: g.Readings["dev-a"][:1]},
		Item{Device: "dev-c", ReceivedAt: t0 + 60_000, Readings: []Reading{old}},
		Item{Device: "dev-d", ReceivedAt: t0 + 60_000, Readings: g.Readings["dev-d"]},
		// dev-b was pre-provisioned: its first reading registers nothing.
		Item{Device: "dev-b", ReceivedAt: t0 + 70_000, Readings: []Reading{reading(t0+70_000, "b1", "temp", 3.0)}},
	)
	for i, want := range []ItemResult{{Duplicates: 1}, {Duplicates: 1}, {Duplicates: 1}, {Stored: 1}} {
		if res[i] != want {
			t.Errorf("item %d: %+v, want %+v", i, res[i], want)
		}
	}
	if c := s.Counts(); c.Devices != before.Devices || c.Readings != before.Readings+1 {
		t.Fatalf("counts %+v after redeliveries and a pre-provisioned device's reading, were %+v", c, before)
	}
	want := map[string]int64{"dev-a": g.Devices[0].LastSeen, "dev-b": t0 + 70_000, "dev-c": t0 + 60_000, "dev-d": t0 + 60_000}
	s = reopen(t, s)
	for _, d := range allDevices(t, s) {
		if d.LastSeen != want[d.ID] {
			t.Errorf("%s: last_seen %d, want %d", d.ID, d.LastSeen, want[d.ID])
		}
		if one, err := s.Device(d.ID); err != nil || jsonOf(t, one) != jsonOf(t, d) {
			t.Errorf("Device(%s) = %+v, %v; Devices has %+v", d.ID, one, err, d)
		}
	}
	if d, _ := s.Device("dev-b"); string(d.Desired.State()["interval"]) != "30" {
		t.Errorf("dev-b's desired state after its first reading: %v", d.Desired.State())
	}
	if d, _ := s.Device("dev-a"); string(d.Reported.State()["fw"]) != `"1.2"` {
		t.Errorf("dev-a's reported state: %v", d.Reported.State())
	}
}

// A batch of readings leaves a known device's JSON record as it is and
// moves last_seen in its own record; a state change rewrites the JSON
// record, with last_seen.
func TestIngestReadingsKeepDeviceRecord(t *testing.T) {
	s := openTestStore(t, "", Options{NoSync: true})
	record := func() string {
		var v string
		s.db.View(func(tx *bolt.Tx) error { v = string(tx.Bucket(bucketDevices).Get([]byte("d1"))); return nil })
		return v
	}
	mustIngest(t, s, Item{Device: "d1", ReceivedAt: t0, Readings: []Reading{reading(t0, "", "temp", 1.0)}})
	first := record()
	for i := int64(1); i <= 3; i++ {
		mustIngest(t, s, Item{Device: "d1", ReceivedAt: t0 + i, Readings: []Reading{reading(t0+i, "", "temp", 1.0)}})
	}
	if got := record(); got != first {
		t.Fatalf("a batch of readings rewrote the device record:\n%s\nwas\n%s", got, first)
	}
	if d, err := s.Device("d1"); err != nil || d.LastSeen != t0+3 {
		t.Fatalf("Device = %+v, %v; want last_seen %d", d, err, t0+3)
	}
	// Received out of order: last_seen does not go back.
	mustIngest(t, s, Item{Device: "d1", ReceivedAt: t0 + 1, Readings: []Reading{reading(t0+1, "x", "temp", 2.0)}})
	mustIngest(t, s, Item{Device: "d1", ReceivedAt: t0 + 9, State: map[string]json.RawMessage{"fw": json.RawMessage(`"2"`)}})
	var rec Device
	if err := json.Unmarshal([]byte(record()), &rec); err != nil {
		t.Fatal(err)
	}
	if rec.LastSeen != t0+9 || string(rec.Reported.State()["fw"]) != `"2"` {
		t.Fatalf("record after a state change: %+v", rec)
	}
	if ds := allDevices(t, s); len(ds) != 1 || ds[0].LastSeen != t0+9 {
		t.Fatalf("Devices = %s", jsonOf(t, ds))
	}
}

// Ingest skips the dedupe lookup of a reading newer than any stored for
// its device. It must still catch every redelivery: after a restart (the
// bound is learnt again), older than the newest, within one batch, and
// after a batch that rolled back (its bound is too high, never too low).
func TestIngestDedupeWithNewestBound(t *testing.T) {
	s := openTestStore(t, "", Options{NoSync: true})
	batch := func(from, n int) Item {
		it := Item{Device: "d1", ReceivedAt: t0}
		for i := from; i < from+n; i++ {
			it.Readings = append(it.Readings, reading(t0+int64(i)*1000, fmt.Sprintf("m%d", i), "temp", float64(i)))
		}
		return it
	}
	noID := func(ts int64) Item {
		return Item{Device: "d1", ReceivedAt: t0, Readings: []Reading{reading(ts, "", "temp", 7.0)}}
	}
	check := func(name string, got []ItemResult, stored, dupes int) {
		t.Helper()
		var st, du int
		for _, r := range got {
			st, du = st+r.Stored, du+r.Duplicates
		}
		if st != stored || du != dupes {
			t.Fatalf("%s: stored %d, duplicates %d; want %d, %d", name, st, du, stored, dupes)
		}
	}
	check("first", mustIngest(t, s, batch(0, 10), noID(t0+500)), 11, 0)
	check("older and newest again", mustIngest(t, s, batch(3, 2), batch(9, 1), noID(t0+500)), 0, 4)
	check("within one batch", mustIngest(t, s, batch(10, 2), batch(11, 2)), 3, 1)
	s = reopen(t, s)
	check("after a restart", mustIngest(t, s, batch(11, 1), noID(t0+500), batch(0, 1)), 0, 3)

	// The failing item comes after d1's new readings (bbolt refuses the
	// empty bucket name): the batch rolls back with d1's bound raised.
	if _, err := s.Ingest([]Item{batch(20, 5), {Device: "", Readings: []Reading{reading(t0, "", "temp", 1.0)}}}, nil); err == nil {
		t.Fatal("a batch with an empty device id committed")
	}
	check("after a rollback", mustIngest(t, s, batch(20, 5)), 5, 0)
	check("after a rollback, again", mustIngest(t, s, batch(20, 5)), 0, 5)
	if got := len(allReadings(t, s, "d1", ReadingsQuery{})); got != 19 {
		t.Fatalf("%d readings stored, want 19", got)
	}
}

// A batch writes one readings entry per device, holding the device's new
// readings of all its items in order, with its sequence taken at the
// device's first new reading; the readings stored carry that sequence
// (retention deletes them once it is acknowledged). An entry gathers at
// most maxEntryReadings from a batch.
func TestIngestOneReadingsEntryPerDevice(t *testing.T) {
	s := openTestStore(t, "", Options{NoSync: true})
	res := mustIngest(t, s,
		item("a", reading(t0, "a1", "t", 1.0)),
		item("b", reading(t0, "b1", "t", 2.0)),
		Item{Device: "a", ReceivedAt: t0, State: raw("fw", `"1"`)},
		item("a", reading(t0+1, "a2", "t", 3.0), reading(t0, "a1", "t", 1.0)), // a1 again: a duplicate
		item("b", reading(t0+1, "b2", "t", 4.0)),
	)
	if res[3] != (ItemResult{Stored: 1, Duplicates: 1}) {
		t.Fatalf("item 3: %+v", res[3])
	}
	out, err := s.Outbox(0, 100, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, c := range out {
		e := fmt.Sprintf("%d %s %s", c.Seq, c.Kind, c.Device)
		for _, r := range c.Readings {
			e += " " + r.ID
		}
		got = append(got, e)
	}
	want := []string{"1 readings a a1 a2", "2 readings b b1 b2", "3 reported a"}
	if strings.Join(got, "; ") != strings.Join(want, "; ") {
		t.Fatalf("outbox:\n got %q\nwant %q", got, want)
	}
	// Only a's readings travel in entry 1.
	if err := s.AckOutbox(1); err != nil {
		t.Fatal(err)
	}
	if r, err := s.Prune(t.Context(), t0+60_000); err != nil || r.Deleted != 2 || r.Unsynced != 2 {
		t.Fatalf("Prune after acking entry 1: %+v, %v; want 2 deleted (a's), 2 unsynced (b's)", r, err)
	}

	many := func(dev string, from, n int) Item {
		it := Item{Device: dev, ReceivedAt: t0}
		for i := from; i < from+n; i++ {
			it.Readings = append(it.Readings, reading(t0+10_000+int64(i), "", "t", float64(i)))
		}
		return it
	}
	mustIngest(t, s, many("c", 0, 400), many("c", 400, 400), many("c", 800, 400), many("d", 0, maxEntryReadings+1))
	out, err = s.Outbox(3, 100, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	got = got[:0]
	for _, c := range out {
		got = append(got, fmt.Sprintf("%d %s %d", c.Seq, c.Device, len(c.Readings)))
	}
	want = []string{"4 c 800", "5 c 400", "6 d 1001"}
	if strings.Join(got, "; ") != strings.Join(want, "; ") {
		t.Fatalf("outbox of large items:\n got %q\nwant %q", got, want)
	}
}
