package syncer

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/pkg/store"
)

type metrics struct {
	connected      prometheus.Gauge
	lastSync       prometheus.Gauge
	clockOffset    prometheus.Gauge
	pushSeconds    prometheus.Histogram
	batchChanges   prometheus.Histogram
	batchReadings  prometheus.Histogram
	pushedReadings prometheus.Counter
	retries        *prometheus.CounterVec
	rejected       prometheus.Counter
	conflicts      prometheus.Counter
	pulled         *prometheus.CounterVec
	resyncs        prometheus.Counter
	acked          prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer, st *store.Store) *metrics {
	m := &metrics{
		connected: prometheus.NewGauge(prometheus.GaugeOpts{Name: "outpost_sync_connected",
			Help: "1 while the last exchange with the cloud succeeded."}),
		lastSync: prometheus.NewGauge(prometheus.GaugeOpts{Name: "outpost_sync_last_success_timestamp_seconds",
			Help: "Unix time of the last successful exchange with the cloud."}),
		clockOffset: prometheus.NewGauge(prometheus.GaugeOpts{Name: "outpost_sync_clock_offset_seconds",
			Help: "This edge's clock minus the cloud's, measured at the last heartbeat."}),
		pushSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "outpost_sync_push_duration_seconds",
			Help: "Time from sending a push to the cloud's raft-committed acknowledgement.", Buckets: prometheus.ExponentialBuckets(0.002, 2, 14)}),
		batchChanges: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "outpost_sync_batch_changes",
			Help: "Outbox changes per push.", Buckets: prometheus.ExponentialBuckets(1, 4, 9)}),
		batchReadings: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "outpost_sync_batch_readings",
			Help: "Readings per push.", Buckets: prometheus.ExponentialBuckets(1, 4, 10)}),
		pushedReadings: prometheus.NewCounter(prometheus.CounterOpts{Name: "outpost_sync_pushed_readings_total",
			Help: "Readings the cloud acknowledged."}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outpost_sync_retries_total",
			Help: "Failed sync exchanges that will be retried, by operation and reason (error, throttled, gap)."}, []string{"op", "reason"}),
		rejected: prometheus.NewCounter(prometheus.CounterOpts{Name: "outpost_sync_stamps_rejected_total",
			Help: "HLC stamps rejected for exceeding the maximum clock drift (pulled here, or reported by the cloud for pushed changes)."}),
		conflicts: prometheus.NewCounter(prometheus.CounterOpts{Name: "outpost_sync_conflicts_resolved_total",
			Help: "Pulled changes that lost the last-writer-wins merge to a newer local write."}),
		pulled: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outpost_sync_pulled_changes_total",
			Help: "Cloud-side changes pulled, by kind."}, []string{"kind"}),
		acked: prometheus.NewGauge(prometheus.GaugeOpts{Name: "outpost_sync_acked_seq",
			Help: "Highest outbox sequence the cloud acknowledged (the push cursor; it never moves backwards)."}),
		resyncs: prometheus.NewCounter(prometheus.CounterOpts{Name: "outpost_sync_full_resyncs_total",
			Help: "Pulls restarted from the beginning (offline longer than the maximum window, or cursor refused)."}),
	}
	if reg == nil {
		return m
	}
	lag := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "outpost_sync_lag_seconds",
		Help: "Age of the oldest change not yet acknowledged by the cloud (0 when in sync)."}, func() float64 {
		ts, err := st.OldestUnsynced()
		if err != nil || ts.IsZero() {
			return 0
		}
		return max(time.Since(time.UnixMilli(ts.WallMs())).Seconds(), 0)
	})
	reg.MustRegister(m.connected, m.lastSync, m.clockOffset, m.pushSeconds, m.batchChanges, m.batchReadings,
		m.pushedReadings, m.retries, m.rejected, m.conflicts, m.pulled, m.resyncs, m.acked, lag)
	return m
}
