// Package benchproc holds what the bench and demo commands (and the e2e
// tests) share for running the real binaries as child processes on
// loopback: free addresses, waiting for a process's HTTP endpoint, reading
// its memory and CPU time from /proc and its /metrics page.
package benchproc

import (
	"context"
	"fmt"
	"math"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// FreeAddr returns a loopback address ("127.0.0.1:port") that was free a
// moment ago. It panics if no port can be had.
func FreeAddr() string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// WaitHTTP polls url until it answers 200 OK, ctx ends, or d passes.
func WaitHTTP(ctx context.Context, url string, d time.Duration) error {
	return WaitHTTPClient(ctx, http.DefaultClient, url, d)
}

// WaitHTTPClient is WaitHTTP with hc (an https URL with a private CA).
func WaitHTTPClient(ctx context.Context, hc *http.Client, url string, d time.Duration) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if resp, err := hc.Get(url); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready within %s", url, d)
}

// StatusMB reads /proc/<pid>/status once and returns its kB-valued fields
// (VmRSS, VmHWM, RssAnon, RssFile, …) in MiB, keyed by name without the
// colon. It returns an empty map if the file cannot be read.
func StatusMB(pid int) map[string]float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return map[string]float64{}
	}
	return parseStatus(string(b))
}

func parseStatus(s string) map[string]float64 {
	out := map[string]float64{}
	for _, line := range strings.Split(s, "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		num, ok := strings.CutSuffix(strings.TrimSpace(v), "kB")
		if !ok {
			continue
		}
		if kb, err := strconv.ParseFloat(strings.TrimSpace(num), 64); err == nil {
			out[k] = kb / 1024
		}
	}
	return out
}

// CPUSeconds is the user+system CPU time the process pid has used so far,
// from /proc/<pid>/stat.
func CPUSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStatCPU(string(b))
}

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat's times: 100 on every
// Linux architecture Go supports (the kernel ABI fixes it, whatever HZ is).
const clockTicks = 100

// parseStatCPU reads utime and stime (fields 14 and 15) of a
// /proc/<pid>/stat line. The command name (field 2) is in parentheses and
// may itself hold spaces and parentheses, so fields are counted from the
// last ')'.
func parseStatCPU(s string) (float64, error) {
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("stat: no command name in %q", s)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state), so utime (14) and stime (15) are f[11], f[12].
	if len(f) < 13 {
		return 0, fmt.Errorf("stat: %d fields after the command name, want at least 13", len(f))
	}
	ut, err := strconv.ParseUint(f[11], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("stat: utime: %w", err)
	}
	st, err := strconv.ParseUint(f[12], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("stat: stime: %w", err)
	}
	return float64(ut+st) / clockTicks, nil
}

// Metrics is a scraped Prometheus text exposition (a /metrics page), one
// value per series.
type Metrics struct {
	samples map[string]float64
}

// Scrape fetches and parses the /metrics page at url with hc.
func Scrape(hc *http.Client, url string) (Metrics, error) { return ScrapeAuth(hc, url, "") }

// ScrapeAuth is Scrape with a bearer token (cloud-sync's /metrics needs
// its metrics or API token); "" sends none.
func ScrapeAuth(hc *http.Client, url, token string) (Metrics, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return Metrics{}, err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return Metrics{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return Metrics{}, fmt.Errorf("%s: %s", url, resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		return Metrics{}, fmt.Errorf("parse %s: %w", url, err)
	}
	m := Metrics{samples: map[string]float64{}}
	for name, mf := range families {
		for _, s := range mf.GetMetric() {
			m.add(name, s)
		}
	}
	return m, nil
}

// Buckets is the histogram name's cumulative bucket counts by upper bound
// (an unlabelled histogram; empty if the page has none).
func (m Metrics) Buckets(name string) map[float64]float64 {
	out := map[float64]float64{}
	prefix := name + `_bucket{le="`
	for s, v := range m.samples {
		if le, ok := strings.CutPrefix(s, prefix); ok {
			if b, err := strconv.ParseFloat(strings.TrimSuffix(le, `"}`), 64); err == nil {
				out[b] = v
			}
		}
	}
	return out
}

// add records the series of one sample as the text format spells them:
// summaries and histograms as their _sum, _count and quantile or bucket
// series.
func (m Metrics) add(name string, s *dto.Metric) {
	labels := s.GetLabel()
	switch {
	case s.Counter != nil:
		m.samples[series(name, labels, "")] = s.GetCounter().GetValue()
	case s.Gauge != nil:
		m.samples[series(name, labels, "")] = s.GetGauge().GetValue()
	case s.Untyped != nil:
		m.samples[series(name, labels, "")] = s.GetUntyped().GetValue()
	case s.Summary != nil:
		sm := s.GetSummary()
		m.samples[series(name+"_sum", labels, "")] = sm.GetSampleSum()
		m.samples[series(name+"_count", labels, "")] = float64(sm.GetSampleCount())
		for _, q := range sm.GetQuantile() {
			m.samples[series(name, labels, `quantile="`+formatFloat(q.GetQuantile())+`"`)] = q.GetValue()
		}
	case s.Histogram != nil:
		h := s.GetHistogram()
		m.samples[series(name+"_sum", labels, "")] = h.GetSampleSum()
		m.samples[series(name+"_count", labels, "")] = float64(h.GetSampleCount())
		for _, b := range h.GetBucket() {
			m.samples[series(name+"_bucket", labels, `le="`+formatFloat(b.GetUpperBound())+`"`)] = float64(b.GetCumulativeCount())
		}
	}
}

// series spells a series as client_golang writes it: labels sorted by name,
// then extra (a summary's quantile or a bucket's le label), if any.
func series(name string, labels []*dto.LabelPair, extra string) string {
	pairs := make([]string, 0, len(labels)+1)
	for _, l := range labels {
		pairs = append(pairs, l.GetName()+`="`+labelEscaper.Replace(l.GetValue())+`"`)
	}
	sort.Strings(pairs)
	if extra != "" {
		pairs = append(pairs, extra)
	}
	if len(pairs) == 0 {
		return name
	}
	return name + "{" + strings.Join(pairs, ",") + "}"
}

// labelEscaper escapes a label value as the text format does.
var labelEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)

func formatFloat(f float64) string {
	switch {
	case math.IsInf(f, 1):
		return "+Inf"
	case math.IsInf(f, -1):
		return "-Inf"
	}
	return strconv.FormatFloat(f, 'g', -1, 64)
}

// Value returns the sample of series: its full name, labels included and
// sorted by name (`outpost_cloud_push_total{edge="e1",result="ok"}`); a
// histogram's or summary's as `name_count`, `name_sum`, or
// `name_bucket{le="0.5"}`.
func (m Metrics) Value(series string) (float64, bool) {
	v, ok := m.samples[series]
	return v, ok
}
