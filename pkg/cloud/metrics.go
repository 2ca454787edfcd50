package cloud

import (
	"context"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
)

// fsmMetrics are the state machine's metrics; they exist before the FSM
// does, so Start builds them first and passes Hooks() to fsm.Open.
type fsmMetrics struct {
	restores  prometheus.Counter
	readings  *prometheus.CounterVec
	conflicts prometheus.Counter
}

// newFSMMetrics registers the state machine's metrics.
func newFSMMetrics(reg prometheus.Registerer) *fsmMetrics {
	m := &fsmMetrics{
		restores: prometheus.NewCounter(prometheus.CounterOpts{Name: "outpost_cloud_snapshot_restores_total",
			Help: "Snapshots installed into this node's state."}),
		readings: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outpost_cloud_readings_applied_total",
			Help: "Readings applied to this node's state, by result (new or duplicate)."}, []string{"result"}),
		conflicts: prometheus.NewCounter(prometheus.CounterOpts{Name: "outpost_cloud_conflicts_resolved_total",
			Help: "State fields, device meta and user records this node's merge discarded because a newer write was already stored (last writer wins)."}),
	}
	reg.MustRegister(m.restores, m.readings, m.conflicts)
	return m
}

// Hooks adapts the metrics to fsm.Hooks.
func (m *fsmMetrics) Hooks() fsm.Hooks {
	return fsm.Hooks{
		OnRestore: m.restores.Inc,
		OnReadings: func(added, dups int) {
			m.readings.WithLabelValues("new").Add(float64(added))
			m.readings.WithLabelValues("duplicate").Add(float64(dups))
		},
		OnConflicts: func(n int) { m.conflicts.Add(float64(n)) },
	}
}

// bucketMetrics are the state's sizes per bucket. Measuring walks every
// page of the state, so they are refreshed on a ticker (bucketStatsEvery),
// not per scrape.
type bucketMetrics struct {
	keys, bytes *prometheus.GaugeVec
	file        prometheus.Gauge
}

// bucketStatsEvery is how often the bucket gauges are refreshed.
const bucketStatsEvery = 30 * time.Second

func newBucketMetrics(reg prometheus.Registerer) *bucketMetrics {
	m := &bucketMetrics{
		keys: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "outpost_cloud_bucket_keys",
			Help: "Keys in each bucket of this node's state (refreshed every 30s)."}, []string{"bucket"}),
		bytes: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "outpost_cloud_bucket_bytes",
			Help: "Bytes the pages of each bucket of this node's state use (refreshed every 30s)."}, []string{"bucket"}),
		file: prometheus.NewGauge(prometheus.GaugeOpts{Name: "outpost_cloud_state_file_bytes",
			Help: "Size of this node's state file, free pages included (refreshed every 30s)."}),
	}
	reg.MustRegister(m.keys, m.bytes, m.file)
	return m
}

// refresh measures st once.
func (m *bucketMetrics) refresh(st *fsm.FSM) error {
	stats, size, err := st.BucketStats()
	if err != nil {
		return err
	}
	for _, s := range stats {
		m.keys.WithLabelValues(s.Name).Set(float64(s.Keys))
		m.bytes.WithLabelValues(s.Name).Set(float64(s.Bytes))
	}
	m.file.Set(float64(size))
	return nil
}

// run refreshes the gauges now and every interval until ctx ends.
func (m *bucketMetrics) run(ctx context.Context, st *fsm.FSM, interval time.Duration, log *slog.Logger) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		if err := m.refresh(st); err != nil && ctx.Err() == nil {
			log.Warn("measuring state buckets failed", "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
