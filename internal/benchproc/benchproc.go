// Package benchproc holds what the bench and demo commands share for running
// the real binaries as child processes on loopback: free addresses, waiting
// for a process's HTTP endpoint, and reading its memory from /proc.
package benchproc

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
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
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if resp, err := http.Get(url); err == nil {
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

// Metrics is a scraped Prometheus text exposition (a /metrics page).
type Metrics string

// Scrape fetches the /metrics page at url with hc.
func Scrape(hc *http.Client, url string) (Metrics, error) {
	resp, err := hc.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", fmt.Errorf("read %s: %w", url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s: %s", url, resp.Status)
	}
	return Metrics(raw), nil
}

// Value returns the sample of series: its full name, labels included
// (`outpost_cloud_push_total{edge="e1",result="ok"}`).
func (m Metrics) Value(series string) (float64, bool) {
	for _, line := range strings.Split(string(m), "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return f, err == nil
		}
	}
	return 0, false
}
