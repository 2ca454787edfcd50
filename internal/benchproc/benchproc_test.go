package benchproc

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"testing"
	"time"
)

func TestParseStatus(t *testing.T) {
	got := parseStatus("Name:\tedge\nVmHWM:\t    2048 kB\nVmRSS:\t    1024 kB\nRssAnon:\t     512 kB\nThreads:\t7\n")
	want := map[string]float64{"VmHWM": 2, "VmRSS": 1, "RssAnon": 0.5}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %v, want %v", k, got[k], v)
		}
	}
}

func TestStatusMBSelf(t *testing.T) {
	if _, err := os.Stat("/proc/self/status"); err != nil {
		t.Skip("no /proc")
	}
	if rss := StatusMB(os.Getpid())["VmRSS"]; rss <= 0 {
		t.Fatalf("VmRSS of this process = %v", rss)
	}
	if m := StatusMB(-1); len(m) != 0 {
		t.Fatalf("missing process: %v", m)
	}
}

func TestParseStatCPU(t *testing.T) {
	tests := []struct {
		name, line string
		want       float64
		ok         bool
	}{
		{"plain", "4242 (cloud-sync) S 1 4242 4242 0 -1 4194560 1200 0 0 0 250 75 0 0 20 0 9 0 123 456 789 18446744073709551615", 3.25, true},
		{"name with spaces and parentheses", "7 (a) (b c) R 1 7 7 0 -1 0 0 0 0 0 1 2 0 0 20 0 1 0 1 1 1", 0.03, true},
		{"truncated", "7 (x) R 1 7", 0, false},
		{"no name", "garbage", 0, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseStatCPU(tc.line)
			if (err == nil) != tc.ok || got != tc.want {
				t.Fatalf("parseStatCPU = %v, %v; want %v, ok=%v", got, err, tc.want, tc.ok)
			}
		})
	}
}

// TestCPUSecondsSelf: this process's CPU time is read and grows when it
// burns CPU; a missing process is an error.
func TestCPUSecondsSelf(t *testing.T) {
	if _, err := os.Stat("/proc/self/stat"); err != nil {
		t.Skip("no /proc")
	}
	before, err := CPUSeconds(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	x := 0
	for time.Now().Before(deadline) {
		for i := 0; i < 1e6; i++ {
			x += i
		}
		if after, err := CPUSeconds(os.Getpid()); err == nil && after > before {
			return
		}
	}
	t.Fatalf("CPU time did not grow from %v after 5s of spinning (%d)", before, x)
}

func TestWaitHTTP(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}))
	defer srv.Close()
	if err := WaitHTTP(context.Background(), srv.URL, time.Second); err != nil {
		t.Fatal(err)
	}
	if err := WaitHTTP(context.Background(), "http://"+FreeAddr(), 100*time.Millisecond); err == nil {
		t.Fatal("a closed port answered")
	}
}

func TestScrape(t *testing.T) {
	page := "# HELP outpost_x_total X.\n# TYPE outpost_x_total counter\n" +
		"outpost_x_total 3\noutpost_x_total_extra 9\noutpost_y{edge=\"e1\",result=\"ok\"} 1.5e+06\n" +
		"# TYPE outpost_h histogram\noutpost_h_bucket{op=\"a\\\"b\",le=\"0.5\"} 2\noutpost_h_bucket{op=\"a\\\"b\",le=\"+Inf\"} 5\n" +
		"outpost_h_sum{op=\"a\\\"b\"} 7.5\noutpost_h_count{op=\"a\\\"b\"} 5\n" +
		"# TYPE outpost_s summary\noutpost_s{quantile=\"0.99\"} 0.25\noutpost_s_sum 4\noutpost_s_count 40\n"
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/metrics" {
			http.NotFound(w, r)
			return
		}
		_, _ = w.Write([]byte(page))
	}))
	defer srv.Close()
	m, err := Scrape(srv.Client(), srv.URL+"/metrics")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		series string
		want   float64
		ok     bool
	}{
		{"outpost_x_total", 3, true},
		{`outpost_y{edge="e1",result="ok"}`, 1.5e6, true},
		{"outpost_x", 0, false},
		{"outpost_missing", 0, false},
		{`outpost_h_count{op="a\"b"}`, 5, true},
		{`outpost_h_sum{op="a\"b"}`, 7.5, true},
		{`outpost_h_bucket{op="a\"b",le="0.5"}`, 2, true},
		{`outpost_h_bucket{op="a\"b",le="+Inf"}`, 5, true},
		{`outpost_s{quantile="0.99"}`, 0.25, true},
		{"outpost_s_count", 40, true},
		{"outpost_h", 0, false},
	}
	for _, tc := range tests {
		if got, ok := m.Value(tc.series); got != tc.want || ok != tc.ok {
			t.Errorf("%s = %v, %v; want %v, %v", tc.series, got, ok, tc.want, tc.ok)
		}
	}
	if _, err := Scrape(srv.Client(), srv.URL+"/nope"); err == nil {
		t.Error("a 404 page scraped without error")
	}
}
