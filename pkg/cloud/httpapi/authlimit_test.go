package httpapi

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/outpost-edge/outpost/pkg/cloud/auth"
)

// TestSecurityAuthFailureThrottle: Low finding "Cloud credentials: no
// throttle on auth failures (about 7000 guesses/s)". On a real listener, a
// burst of unknown tokens from one address (127.0.0.2) turns into 429 with
// Retry-After once its failures pass the limit, before the token is even
// checked, and stays so for that address's good token too; a good token
// from another address (127.0.0.1) still works; the failures are counted in
// outpost_cloud_auth_failures_total by reason.
func TestSecurityAuthFailureThrottle(t *testing.T) {
	static, err := auth.NewStatic(map[string]string{"e1": edgeToken}, apiToken)
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	// 1 failure/s (burst 2) rather than the default 10: the refill then
	// cannot blur the test's timing.
	s, err := New(Config{NodeID: "n1", AuthFailureLimit: 1, HasAPIToken: true}, &fakeService{}, auth.Chain{static, users{}},
		slog.New(slog.NewTextHandler(io.Discard, nil)), reg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = s.App().Listener(ln) }()
	t.Cleanup(func() { _ = s.Shutdown(context.Background()) })
	url := "http://" + ln.Addr().String() + "/api/v1/edges"

	from := func(ip string) *http.Client {
		d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 5 * time.Second}
		return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: d.DialContext}}
	}
	get := func(c *http.Client, token string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, resp.Body)
		return resp.StatusCode, resp.Header.Get("Retry-After")
	}
	attacker, other := from("127.0.0.2"), from("127.0.0.1")
	if code, _ := get(attacker, apiToken); code != http.StatusOK {
		t.Fatalf("the attacker's address before any failure: %d, want 200", code)
	}

	const guesses = 50
	var unauthorized, throttled int
	start := time.Now()
	for i := 0; i < guesses; i++ {
		code, retry := get(attacker, "guess-"+strconv.Itoa(i))
		switch code {
		case http.StatusUnauthorized:
			unauthorized++
		case http.StatusTooManyRequests:
			throttled++
			if n, err := strconv.Atoi(retry); err != nil || n < 1 {
				t.Fatalf("429 with Retry-After %q, want whole seconds ≥ 1", retry)
			}
		default:
			t.Fatalf("guess %d: %d", i, code)
		}
	}
	// The burst of 2, plus what refilled at 1/s while the loop ran.
	if limit := 2 + int(time.Since(start).Seconds()) + 1; throttled == 0 || unauthorized > limit {
		t.Fatalf("%d of %d guesses checked (401), %d throttled (429): want at most %d checked and the rest throttled",
			unauthorized, guesses, throttled, limit)
	}
	if code, _ := get(attacker, apiToken); code != http.StatusTooManyRequests {
		t.Fatalf("the throttled address's good token: %d, want 429 until it slows down", code)
	}
	if code, _ := get(other, apiToken); code != http.StatusOK {
		t.Fatalf("a good token from another address: %d, want 200", code)
	}
	if code, _ := get(other, edgeToken); code != http.StatusForbidden {
		t.Fatalf("an edge token on the consumer API from another address: %d, want 403 (authenticated, not throttled)", code)
	}

	counts := map[string]float64{}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "outpost_cloud_auth_failures_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			counts[label(m, "reason")] += m.GetCounter().GetValue()
		}
	}
	if counts["unknown"] != float64(unauthorized) || counts["throttled"] != float64(throttled+1) {
		t.Fatalf("outpost_cloud_auth_failures_total %v, want unknown=%d throttled=%d", counts, unauthorized, throttled+1)
	}
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}
