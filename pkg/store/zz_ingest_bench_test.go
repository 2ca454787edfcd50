package store

import (
	"fmt"
	"path/filepath"
	"testing"
)

func BenchmarkIngestBatch100(b *testing.B) {
	for _, nosync := range []bool{false, true} {
		b.Run(fmt.Sprintf("nosync=%v", nosync), func(b *testing.B) {
			st, err := Open(filepath.Join(b.TempDir(), "e.db"), Options{NoSync: nosync})
			if err != nil {
				b.Fatal(err)
			}
			defer st.Close()
			ts := int64(1732170000000)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				items := make([]Item, 100)
				for d := range items {
					items[d] = Item{Device: fmt.Sprintf("dev-%d", d), ReceivedAt: ts, Readings: []Reading{{TS: ts, ID: fmt.Sprintf("m%d", i), Metrics: []Metric{{"temp", 21.5}, {"hum", 40}}}}}
				}
				ts++
				if _, err := st.Ingest(items, nil); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N*100)/b.Elapsed().Seconds(), "msgs/s")
		})
	}
}
