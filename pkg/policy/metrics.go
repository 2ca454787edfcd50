package policy

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	decisions      *prometheus.CounterVec
	denials        *prometheus.CounterVec
	evalDuration   prometheus.Histogram
	reloads        prometheus.Counter
	reloadFailures prometheus.Counter
	cacheHits      prometheus.Counter
	cacheMisses    prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outpost_policy_decisions_total",
			Help: "Authorisation decisions by result (allow, deny, error), cached or not.",
		}, []string{"result"}),
		denials: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outpost_policy_denials_total",
			Help: "Requests the policy denied, by action and resource kind.",
		}, []string{"action", "kind"}),
		evalDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "outpost_policy_eval_duration_seconds",
			Help:    "Time to evaluate the policy for decisions not served from the cache.",
			Buckets: prometheus.ExponentialBuckets(10e-6, 2.5, 10), // 10µs .. ~38ms
		}),
		reloads: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "outpost_policy_reloads_total",
			Help: "Policy versions loaded successfully, including the first.",
		}),
		reloadFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "outpost_policy_reload_failures_total",
			Help: "Policy loads that failed; the last good policy stayed in force.",
		}),
		cacheHits: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "outpost_policy_cache_hits_total",
			Help: "Decisions served from the decision cache.",
		}),
		cacheMisses: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "outpost_policy_cache_misses_total",
			Help: "Decisions that needed a policy evaluation.",
		}),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.decisions, m.denials, m.evalDuration, m.reloads, m.reloadFailures, m.cacheHits, m.cacheMisses} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("policy: register metrics: %w", err)
		}
	}
	return m, nil
}

func (m *metrics) observe(in Input, d Decision) {
	if d.Allow {
		m.decisions.WithLabelValues("allow").Inc()
	} else {
		m.decisions.WithLabelValues("deny").Inc()
		m.denials.WithLabelValues(in.Action, in.Resource.Kind).Inc()
	}
}
