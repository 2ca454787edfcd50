package store

import (
	"fmt"
	"reflect"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// legacyBatches are the batches testdata/legacy-layout.dump (see loadDump) was made of, by the
// store as it was before the shared buckets (commit e50b34d: a nested bucket
// per device in readings, ids, rollup_1m and rollup_1h), one Ingest each:
// devices with device timestamps, ids without them (so the ids index has
// entries), readings without ids, several metrics, minutes and hours.
func legacyBatches() [][]Item {
	devs := []string{"d1", "d2", "th-3", "d10"}
	var out [][]Item
	for b := 0; b < 3; b++ {
		var batch []Item
		for di, dev := range devs {
			var rs []Reading
			for k := 0; k < 20; k++ {
				ts := t0 + int64(b*20+k)*121_000 + int64(di) // 2 min apart: two hours
				r := reading(ts, "", "temp", float64(di*100+k)/4, "hum", float64(b))
				switch k % 3 {
				case 0:
					r.ID = fmt.Sprintf("%s-%d-%d", dev, b, k)
				case 1:
					r.ID, r.ReceiveTS = fmt.Sprintf("rx-%s-%d-%d", dev, b, k), true
				}
				if k%5 == 0 {
					r.Metrics = append(r.Metrics, Metric{Name: "v", Value: float64(k)})
				}
				rs = append(rs, r)
			}
			batch = append(batch, Item{Device: dev, ReceivedAt: t0 + int64(b)*60_000, Readings: rs})
		}
		out = append(out, batch)
	}
	return out
}

// readBack is everything a client can read of the test devices' readings.
type readBack struct {
	Counts  [2]uint64 // readings, devices
	Pages   map[string][]Reading
	Latest  map[string]Reading
	Stats   map[string][]StatsBucket
	Devices []string // that Prune would visit
}

func readAll(t *testing.T, s *Store) readBack {
	t.Helper()
	c := s.Counts()
	rb := readBack{Counts: [2]uint64{c.Readings, c.Devices}, Pages: map[string][]Reading{},
		Latest: map[string]Reading{}, Stats: map[string][]StatsBucket{}}
	for _, it := range legacyBatches()[0] {
		dev := it.Device
		rb.Pages[dev] = allReadings(t, s, dev, ReadingsQuery{Limit: 7})
		rb.Pages[dev+"/hum"] = allReadings(t, s, dev, ReadingsQuery{Metric: "hum", Limit: 50, From: t0 + 600_000})
		l, err := s.Latest(dev)
		if err != nil {
			t.Fatalf("Latest(%s): %v", dev, err)
		}
		rb.Latest[dev] = l
		for _, m := range []string{"temp", "v"} {
			for _, step := range []int64{1000, minuteMs, 5 * minuteMs, hourMs} {
				st, err := s.Stats(dev, m, t0-hourMs, t0+3*hourMs, step)
				if err != nil {
					t.Fatalf("Stats(%s, %s, %d): %v", dev, m, step, err)
				}
				rb.Stats[fmt.Sprintf("%s/%s/%d", dev, m, step)] = st
			}
		}
	}
	if err := s.db.View(func(tx *bolt.Tx) error {
		var err error
		rb.Devices, err = spanDevices(tx.Bucket(bucketReadings))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return rb
}

// freshCopy ingests legacyBatches into a new store, in the new layout.
func freshCopy(t *testing.T) *Store {
	t.Helper()
	s := openTestStore(t, "", Options{})
	for _, b := range legacyBatches() {
		mustIngest(t, s, b...)
	}
	return s
}

// checkMigrated asserts that s, opened on a copy of the old-layout
// fixture, holds what the same batches make in the new layout, that no
// legacy bucket is left, and that a redelivery of every batch is
// recognised as one (by key, and by id for readings without a device ts).
func checkMigrated(t *testing.T, s *Store) {
	t.Helper()
	want := readAll(t, freshCopy(t))
	got := readAll(t, s)
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("old file reads back\n%+v\nwant\n%+v", got, want)
	}
	if len(want.Devices) != 4 || want.Counts[0] != 240 {
		t.Fatalf("fixture has %v devices and %d readings, want 4 and 240", want.Devices, want.Counts[0])
	}
	if err := s.db.View(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{legacyReadings, legacyIDs, legacyMinute, legacyHour} {
			if tx.Bucket(b) != nil {
				return fmt.Errorf("legacy bucket %s left", b)
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for i, b := range legacyBatches() {
		for j, r := range mustIngest(t, s, b...) {
			if r.Stored != 0 || r.Duplicates != 20 {
				t.Fatalf("redelivery of batch %d item %d: %+v", i, j, r)
			}
		}
	}
}

// TestOldLayoutOpens opens a file written with a nested bucket per device:
// Open moves it to the shared buckets, and it reads back as the same
// batches written now do.
func TestOldLayoutOpens(t *testing.T) {
	path := loadDump(t, "testdata/legacy-layout.dump")
	if err := func() error {
		db, err := bolt.Open(path, 0o600, nil)
		if err != nil {
			return err
		}
		defer db.Close()
		return db.View(func(tx *bolt.Tx) error {
			if tx.Bucket(legacyReadings).Bucket([]byte("d1")) == nil {
				return fmt.Errorf("fixture is not in the old layout")
			}
			return nil
		})
	}(); err != nil {
		t.Fatal(err)
	}
	checkMigrated(t, openTestStore(t, path, Options{}))
}

// TestOldLayoutMigrationResumes abandons the migration after each of a
// few small transactions (as a crash between two would), then opens the
// file: Open finishes the move and nothing is lost or doubled.
func TestOldLayoutMigrationResumes(t *testing.T) {
	for _, steps := range []int{1, 3, 40, 130} {
		t.Run(fmt.Sprint(steps), func(t *testing.T) {
			path := loadDump(t, "testdata/legacy-layout.dump")
			db, err := bolt.Open(path, 0o600, nil)
			if err != nil {
				t.Fatal(err)
			}
			moved := false
			for i := 0; i < steps; i++ {
				err := db.Update(func(tx *bolt.Tx) error {
					for _, m := range [][2][]byte{{legacyReadings, bucketReadings}, {legacyIDs, bucketIDs}, {legacyMinute, bucketMinute}, {legacyHour, bucketHour}} {
						if tx.Bucket(m[0]) == nil {
							continue
						}
						moved = true
						_, err := migrateChunkOf(tx, m[0], m[1], 7)
						return err
					}
					return nil
				})
				if err != nil {
					t.Fatal(err)
				}
			}
			if err := db.Close(); err != nil {
				t.Fatal(err)
			}
			if !moved {
				t.Fatal("nothing migrated")
			}
			checkMigrated(t, openTestStore(t, path, Options{}))
		})
	}
}

// TestSpanKeepsDevicesApart: a device whose id is another's prefix sees
// only its own keys, from every end.
func TestSpanKeepsDevicesApart(t *testing.T) {
	s := openTestStore(t, "", Options{})
	mustIngest(t, s, item("d", reading(t0+5, "", "a", 1.0)), item("d1", reading(t0, "", "a", 2.0), reading(t0+9, "", "a", 3.0)),
		item("c", reading(t0+1, "", "a", 4.0)))
	for dev, want := range map[string][]float64{"c": {4}, "d": {1}, "d1": {2, 3}} {
		var got []float64
		for _, r := range allReadings(t, s, dev, ReadingsQuery{}) {
			got = append(got, r.Metrics[0].Value)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: %v, want %v", dev, got, want)
		}
		l, err := s.Latest(dev)
		if err != nil || l.Metrics[0].Value != want[len(want)-1] {
			t.Errorf("Latest(%s) = %v, %v", dev, l, err)
		}
	}
	if err := s.db.View(func(tx *bolt.Tx) error {
		devs, err := spanDevices(tx.Bucket(bucketReadings))
		if err != nil || !reflect.DeepEqual(devs, []string{"c", "d", "d1"}) {
			return fmt.Errorf("devices %v, %v", devs, err)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}
