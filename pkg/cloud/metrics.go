package cloud

import (
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
