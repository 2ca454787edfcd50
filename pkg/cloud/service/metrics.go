package service

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	throttled prometheus.Counter
	pushes    *prometheus.CounterVec
	stamps    *prometheus.CounterVec
	backlog   *prometheus.GaugeVec
	refused   *prometheus.CounterVec
	conflicts *prometheus.CounterVec
	// Liveness and pulls (liveness.go).
	durableBeats prometheus.Counter
	heldPulls    prometheus.Gauge
	compacted    *prometheus.CounterVec
	// Alert notifications (notify.go).
	notifications *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		throttled: prometheus.NewCounter(prometheus.CounterOpts{Name: "outpost_cloud_push_throttled_total",
			Help: "Sync pushes answered 429 by admission control."}),
		pushes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outpost_cloud_push_total",
			Help: "Sync pushes handled on the leader, by edge and result."}, []string{"edge", "result"}),
		stamps: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outpost_cloud_rejected_stamps_total",
			Help: "HLC stamps rejected for exceeding the maximum clock drift, by edge."}, []string{"edge"}),
		backlog: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "outpost_cloud_edge_backlog",
			Help: "Outbox backlog each edge last reported in a heartbeat."}, []string{"edge"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outpost_cloud_changes_refused_total",
			Help: "Changes from edges refused under edge restriction, by edge and reason."}, []string{"edge", "reason"}),
		conflicts: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outpost_cloud_seq_conflicts_total",
			Help: "Pushes refused for re-sending applied sequence numbers with other content, by edge."}, []string{"edge"}),
		compacted: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outpost_cloud_compacted_total",
			Help: "Records this node deleted as leader by retention: readings, log entries and tombstones."}, []string{"what"}),
		notifications: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outpost_cloud_notifications_total",
			Help: "Alert notifications (WeChat subscribe messages) this node sent as leader, by result: sent, failed (retried), refused (final)."}, []string{"result"}),
	}
	m.durableBeats = prometheus.NewCounter(prometheus.CounterOpts{Name: "outpost_cloud_heartbeats_durable_total",
		Help: "Heartbeats that changed an edge's durable facts (region, location, advertise URL) and so went through raft; the others stay in the leader's memory."})
	m.heldPulls = prometheus.NewGauge(prometheus.GaugeOpts{Name: "outpost_cloud_pulls_held",
		Help: "Edge pulls the leader is holding until something changes for them (long-poll)."})
	reg.MustRegister(m.throttled, m.pushes, m.stamps, m.backlog, m.refused, m.conflicts, m.durableBeats, m.heldPulls, m.compacted, m.notifications)
	return m
}
