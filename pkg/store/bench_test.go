package store

import (
	"fmt"
	"path/filepath"
	"strconv"
	"testing"
)

// BenchmarkIngest measures one group commit of the shapes the edge sees:
// 100 devices with one reading each, and 10 devices with 100 readings each.
func BenchmarkIngest(b *testing.B) {
	for _, shape := range []struct{ devices, perDevice int }{{100, 1}, {10, 100}} {
		b.Run(fmt.Sprintf("devices=%d/readings=%d", shape.devices, shape.perDevice), func(b *testing.B) {
			st, err := Open(filepath.Join(b.TempDir(), "e.db"), Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer st.Close()
			ts := int64(1732170000000)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				items := make([]Item, shape.devices)
				for d := range items {
					rs := make([]Reading, shape.perDevice)
					for k := range rs {
						rs[k] = Reading{TS: ts + int64(k), ID: "m" + strconv.Itoa(i) + "." + strconv.Itoa(k),
							Metrics: []Metric{{"temp", 21.5}, {"hum", 40}}}
					}
					items[d] = Item{Device: "dev-" + strconv.Itoa(d), ReceivedAt: ts, Readings: rs}
				}
				ts += int64(shape.perDevice)
				if _, err := st.Ingest(items, nil); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N*shape.devices*shape.perDevice)/b.Elapsed().Seconds(), "readings/s")
		})
	}
}

// BenchmarkReadingsPage reads a 1000-reading page of a device with 100k.
func BenchmarkReadingsPage(b *testing.B) {
	st, err := Open(filepath.Join(b.TempDir(), "e.db"), Options{NoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	ts := int64(1732170000000)
	for i := 0; i < 100; i++ {
		rs := make([]Reading, 1000)
		for k := range rs {
			rs[k] = Reading{TS: ts, Metrics: []Metric{{"temp", float64(k % 40)}}}
			ts += 1000
		}
		if _, err := st.Ingest([]Item{{Device: "d", ReceivedAt: ts, Readings: rs}}, nil); err != nil {
			b.Fatal(err)
		}
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		p, err := st.Readings("d", ReadingsQuery{From: 1732170000000 + int64(i%90)*1000_000, Limit: 1000})
		if err != nil || len(p.Items) != 1000 {
			b.Fatal(err, len(p.Items))
		}
	}
}

// BenchmarkIngestCPU is the CPU of one group commit of the shapes edgebench
// produces (100 devices, 1 or 4 messages of each per commit, one reading of
// two metrics per message, device timestamps and ids), without the fsync:
// what encoding, key building, rollups, the device registry and bbolt's
// page writes cost. bbolt rewrites about the same pages whether a device
// has 1 or 4 messages in the commit, so the two show the fixed and the
// per-message part. Both stay within one minute, as edgebench's short run
// does, so each device's rollup buckets stay small enough to live inline
// in their parents' pages; "aged" steps 20 s per commit, as an edge that
// has run for a while: the buckets outgrow inline (after about 8 minutes
// of cells for rollup_1m, 8 hours for rollup_1h) and each commit rewrites
// their own pages too.
func BenchmarkIngestCPU(b *testing.B) {
	for _, perDevice := range []int{1, 4} {
		b.Run(fmt.Sprintf("devices=100/messages=%d", perDevice), func(b *testing.B) { benchIngestCPU(b, 100, perDevice, int64(perDevice)) })
	}
	b.Run("devices=100/messages=1/aged", func(b *testing.B) { benchIngestCPU(b, 100, 1, 20_000) })
}

// benchIngestCPU commits b.N batches of perDevice readings of each device,
// the clock stepping step ms per batch.
func benchIngestCPU(b *testing.B, devices, perDevice int, step int64) {
	st, names := benchStore(b, devices, Options{NoSync: true})
	ts := int64(1732170000000)
	b.ReportAllocs()
	b.ResetTimer()
	writes0 := txWrites(st)
	for i := 0; i < b.N; i++ {
		items := make([]Item, 0, devices*perDevice)
		for d := range names {
			for k := 0; k < perDevice; k++ {
				items = append(items, Item{Device: names[d], ReceivedAt: ts, Readings: []Reading{{
					TS: ts + int64(k), ID: "m" + strconv.Itoa(i) + "." + strconv.Itoa(k),
					Metrics: []Metric{{"temp", 20.5 + float64(k)}, {"hum", 40}},
				}}})
			}
		}
		ts += step
		if _, err := st.Ingest(items, nil); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N*devices*perDevice)/b.Elapsed().Seconds(), "readings/s")
	// One write per page or run of overflow pages: what the commit's pwrites
	// and fdatasync cost grows with.
	b.ReportMetric(float64(txWrites(st)-writes0)/float64(b.N), "pages/commit")
}

// txWrites is how many page writes the store's commits have made.
func txWrites(st *Store) int64 {
	ts := st.db.Stats().TxStats
	return ts.GetWrite()
}

// benchStore opens a store in b's temp dir, closed when b ends, and names
// its devices dev-0 … dev-(devices-1).
func benchStore(b *testing.B, devices int, opts Options) (*Store, []string) {
	b.Helper()
	st, err := Open(filepath.Join(b.TempDir(), "e.db"), opts)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { st.Close() })
	names := make([]string, devices)
	for d := range names {
		names[d] = "dev-" + strconv.Itoa(d)
	}
	return st, names
}
