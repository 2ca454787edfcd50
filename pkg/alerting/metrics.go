package alerting

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	evaluated, errors, fired, cleared, actions, actionErrors prometheus.Counter
	lag, rules                                               prometheus.Gauge
	delay                                                    prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) *metrics {
	c := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
	}
	m := &metrics{
		evaluated:    c("outpost_rules_readings_evaluated_total", "Committed readings the rule engine evaluated."),
		errors:       c("outpost_rules_errors_total", "Rule evaluations that failed at run time (the rule was skipped for that reading)."),
		fired:        c("outpost_rules_alerts_fired_total", "Alerts raised."),
		cleared:      c("outpost_rules_alerts_cleared_total", "Alerts cleared."),
		actions:      c("outpost_rules_actions_total", "Rule actions run (set_desired)."),
		actionErrors: c("outpost_rules_action_errors_total", "Rule actions that failed."),
		lag: prometheus.NewGauge(prometheus.GaugeOpts{Name: "outpost_rules_lag_changes",
			Help: "Outbox changes committed but not yet evaluated by the rule engine."}),
		rules: prometheus.NewGauge(prometheus.GaugeOpts{Name: "outpost_rules_in_force", Help: "Rules in force."}),
		delay: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "outpost_rules_alert_delay_duration_seconds",
			Help:    "From a reading's commit (its outbox stamp) to the alert transition it caused being saved and published.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)}),
	}
	if reg != nil {
		reg.MustRegister(m.evaluated, m.errors, m.fired, m.cleared, m.actions, m.actionErrors, m.lag, m.rules, m.delay)
	}
	return m
}
