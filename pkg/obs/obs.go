// Package obs holds what both daemons share for observability: one naming
// scheme for Prometheus metrics, HTTP request metrics for Fiber apps, build
// information, and the opt-in admin listener (pprof and the runtime log
// level).
//
// Metric names follow outpost_<subsystem>_<name>[_<unit>], with base units
// (seconds, bytes) and _total on counters. Subsystems in use:
//
//	http    API requests on either daemon (route, method, status)
//	policy  authorisation decisions and denials (edge)
//	ingest  MQTT ingest and group commit (edge)
//	store   the edge's bbolt store (edge)
//	sync    the edge's link to the cloud (edge)
//	raft    consensus state, log and apply path (cloud-sync)
//	cloud   cloud-sync's own state machine and sync endpoints (cloud-sync)
//
// The same metric name means the same thing on both daemons; a scrape
// config tells them apart by job.
package obs

import (
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/prometheus/client_golang/prometheus"
)

// HTTPMetrics counts and times API requests by route template, method and
// status.
type HTTPMetrics struct {
	requests *prometheus.CounterVec
	duration *prometheus.HistogramVec
	inFlight prometheus.Gauge
}

// NewHTTPMetrics registers the HTTP metrics with reg (nil: unregistered).
func NewHTTPMetrics(reg prometheus.Registerer) *HTTPMetrics {
	labels := []string{"route", "method", "status"}
	m := &HTTPMetrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outpost_http_requests_total", Help: "HTTP requests by route, method and status.",
		}, labels),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "outpost_http_request_duration_seconds", Help: "HTTP request latency by route, method and status.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16), // 100µs .. ~3.3s
		}, labels),
		inFlight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "outpost_http_requests_in_flight", Help: "HTTP requests being served.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.requests, m.duration, m.inFlight)
	}
	return m
}

// Observe records one finished request. route is the route template
// ("/api/v1/devices/:id"), never the raw path, so cardinality stays bounded.
func (m *HTTPMetrics) Observe(route, method string, status int, d time.Duration) {
	s := strconv.Itoa(status)
	m.requests.WithLabelValues(route, method, s).Inc()
	m.duration.WithLabelValues(route, method, s).Observe(d.Seconds())
}

// Begin marks a request in flight; call the returned function when it ends.
func (m *HTTPMetrics) Begin() func() {
	m.inFlight.Inc()
	return m.inFlight.Dec
}

// Middleware measures every request of a Fiber app. Install it first. An
// error from a handler is rendered by the app's error handler here, so the
// status recorded is the one the client gets.
func (m *HTTPMetrics) Middleware(c *fiber.Ctx) error {
	m.Serve(c)
	return nil
}

// Serve runs the rest of c's handler chain measured, as Middleware does, and
// returns the status the client gets and how long the request took: for a
// middleware that also logs requests.
func (m *HTTPMetrics) Serve(c *fiber.Ctx) (status int, elapsed time.Duration) {
	start := time.Now()
	defer m.Begin()()
	// Copied before the handler runs: Fiber's strings point into buffers
	// that handlers (forwarding, body rewrites) may reuse.
	method := strings.Clone(c.Method())
	if err := c.Next(); err != nil {
		if herr := c.App().ErrorHandler(c, err); herr != nil {
			c.Status(fiber.StatusInternalServerError)
		}
	}
	status, elapsed = c.Response().StatusCode(), time.Since(start)
	m.Observe(c.Route().Path, method, status, elapsed)
	return status, elapsed
}

// Version is the release, set at link time:
// -ldflags "-X github.com/outpost-edge/outpost/pkg/obs.Version=v1.2.3".
var Version string

// RegisterBuildInfo exports outpost_build_info{daemon,version,go_version} 1.
func RegisterBuildInfo(reg prometheus.Registerer, daemon string) {
	version := Version
	if bi, ok := debug.ReadBuildInfo(); ok && version == "" {
		version = bi.Main.Version
	}
	if version == "" {
		version = "(devel)"
	}
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "outpost_build_info", Help: "Always 1; labels say which daemon and build this is.",
		ConstLabels: prometheus.Labels{"daemon": daemon, "version": version, "go_version": runtime.Version()},
	})
	g.Set(1)
	reg.MustRegister(g)
}
