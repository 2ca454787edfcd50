package broker

import (
	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the broker's defences, counted: an operator sees an attack
// (or a misconfigured fleet) in them before devices complain.
type metrics struct {
	acceptErrors prometheus.Counter
	refused      *prometheus.CounterVec
	loginFails   *prometheus.CounterVec
	restored     prometheus.Counter
	fanDropped   prometheus.Counter
	fanConflated prometheus.Counter
	liveSkipped  prometheus.Counter
	liveHold     prometheus.Histogram
	liveDelivery prometheus.Histogram
	phones       prometheus.Gauge
	phoneEnds    *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	// The live feed's latencies, resolved around its target (a
	// publish-to-phone p99 of 50 ms) and up to a few intervals.
	liveBuckets := []float64{.001, .002, .005, .01, .02, .03, .05, .075, .1, .15, .2, .3, .5, 1, 2}
	m := &metrics{
		acceptErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "outpost_mqtt_accept_errors_total",
			Help: "Errors accepting MQTT connections (e.g. EMFILE); the listener backs off and goes on.",
		}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outpost_mqtt_connections_refused_total",
			Help: "MQTT connections closed before CONNECT, by reason (connection_cap, remote: not loopback in loopback-only mode).",
		}, []string{"reason"}),
		loginFails: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outpost_mqtt_login_failures_total",
			Help: "Refused MQTT logins, by reason (bad_credentials, throttled, busy, client_id, will).",
		}, []string{"reason"}),
		restored: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "outpost_mqtt_downlinks_restored_total",
			Help: "Retained desired-state downlinks the edge republished because the broker held something else.",
		}),
		fanDropped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "outpost_mqtt_fanout_dropped_total",
			Help: "Stored messages not routed to subscribers (dashboards, phones) because the fan-out queue was full; they are in the store.",
		}),
		fanConflated: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "outpost_mqtt_fanout_conflated_total",
			Help: "Stored messages not routed to subscribers because a newer message of the same topic was waiting (routing behind); they are in the store.",
		}),
		liveSkipped: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "outpost_mqtt_live_skipped_total",
			Help: "Stored messages not sent to phones because a newer message of the same topic came within the live interval (mqtt.live_interval); they are in the store.",
		}),
		liveHold: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "outpost_mqtt_live_hold_duration_seconds",
			Help:    "From a message's commit to its publish on the live mirror, for phones: the fan-out's queue and the live feed's hold (up to mqtt.live_interval when the topic was sent less than an interval before).",
			Buckets: liveBuckets,
		}),
		liveDelivery: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "outpost_mqtt_live_delivery_duration_seconds",
			Help:    "From a message's commit to its write to a phone's WebSocket (/mqtt): the live feed's hold (up to mqtt.live_interval), the fan-out and the phone's write loop.",
			Buckets: liveBuckets,
		}),
		phones: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "outpost_mqtt_phone_sessions",
			Help: "Phone MQTT sessions over WebSocket (/mqtt) open now.",
		}),
		phoneEnds: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outpost_mqtt_phone_ends_total",
			Help: "Phone sessions closed or subscriptions dropped by the edge, by reason (expired, revoked, published, slow: its socket did not take its live feed, access_lost).",
		}, []string{"reason"}),
	}
	if reg != nil {
		reg.MustRegister(m.acceptErrors, m.refused, m.loginFails, m.restored, m.fanDropped, m.fanConflated, m.liveSkipped, m.liveHold, m.liveDelivery, m.phones, m.phoneEnds)
	}
	return m
}

func (m *metrics) loginFailed(reason string) { m.loginFails.WithLabelValues(reason).Inc() }
