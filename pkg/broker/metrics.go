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
	phones       prometheus.Gauge
	phoneEnds    *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
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
		phones: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "outpost_mqtt_phone_sessions",
			Help: "Phone MQTT sessions over WebSocket (/mqtt) open now.",
		}),
		phoneEnds: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outpost_mqtt_phone_ends_total",
			Help: "Phone sessions closed or subscriptions dropped by the edge, by reason (expired, revoked, published, access_lost).",
		}, []string{"reason"}),
	}
	if reg != nil {
		reg.MustRegister(m.acceptErrors, m.refused, m.loginFails, m.restored, m.fanDropped, m.fanConflated, m.liveSkipped, m.phones, m.phoneEnds)
	}
	return m
}

func (m *metrics) loginFailed(reason string) { m.loginFails.WithLabelValues(reason).Inc() }
