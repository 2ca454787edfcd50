package e2e

import (
	"io"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"
)

// scrape reads a /metrics page, with a bearer token unless it is "".
func scrape(t *testing.T, url, token string) string {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("scrape %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape %s: %d %v", url, resp.StatusCode, err)
	}
	return string(b)
}

var metricFamily = regexp.MustCompile(`(?m)^# TYPE (\S+) (\S+)`)

// checkMetrics asserts every pattern matches a sample line and every family
// of ours follows the one naming scheme.
func checkMetrics(t *testing.T, daemon, page string, want []string) {
	t.Helper()
	for _, w := range want {
		if !regexp.MustCompile(`(?m)^` + w).MatchString(page) {
			t.Errorf("%s /metrics: nothing matches %s", daemon, w)
		}
	}
	scheme := regexp.MustCompile(`^outpost_(http|policy|ingest|store|sync|raft|cloud|broker|mqtt|auth|build|rules)_[a-z0-9_]+$`)
	for _, m := range metricFamily.FindAllStringSubmatch(page, -1) {
		name := m[1]
		switch {
		case strings.HasPrefix(name, "go_"), strings.HasPrefix(name, "process_"), strings.HasPrefix(name, "promhttp_"):
		case !scheme.MatchString(name):
			t.Errorf("%s /metrics: %s does not follow outpost_<subsystem>_<name>", daemon, name)
		case m[2] == "histogram" && strings.HasSuffix(name, "_seconds") && !strings.HasSuffix(name, "_duration_seconds"):
			t.Errorf("%s /metrics: %s: latency histograms are named *_duration_seconds", daemon, name)
		}
	}
}

// TestMetricsEdge scrapes a running edge after an ingest, an allowed and a
// denied request, and checks the admin address serves pprof and the log
// level.
func TestMetricsEdge(t *testing.T) {
	admin := edgeFreeAddr(t)
	e := startEdge(t, "-pprof", admin)
	admTok := e.login()

	c := edgeConnect(t, e.MQTT, "metrics-dev")
	if tok := c.Publish("sensors/metrics-dev/telemetry", 1, false, `{"metrics":{"temp":21.5}}`); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("publish: %v", tok.Error())
	}
	cloudWaitFor(t, 10*time.Second, "the reading to be stored", func() bool {
		return e.api(http.MethodGet, "/api/v1/devices/metrics-dev/latest", admTok, nil, nil) == nil
	})
	var bob struct {
		AccessToken string `json:"access_token"`
	}
	if err := e.api(http.MethodPost, "/api/v1/auth/login", "", map[string]string{"code": "dev:bob"}, &bob); err != nil {
		t.Fatal(err)
	}
	if err := e.api(http.MethodGet, "/api/v1/devices/metrics-dev", bob.AccessToken, nil, nil); err == nil || !strings.Contains(err.Error(), "HTTP 403") {
		t.Fatalf("bob reading someone else's device: %v, want 403", err)
	}

	page := scrape(t, "http://"+e.HTTP+"/metrics", "")
	checkMetrics(t, "edge", page, []string{
		`outpost_build_info\{daemon="edge",`,
		`outpost_http_requests_total\{method="GET",route="/api/v1/devices/:id",status="403"\} 1`,
		`outpost_http_request_duration_seconds_bucket\{method="GET",route="/api/v1/devices/:id/latest",status="200",le="[^"]+"\}`,
		`outpost_http_requests_in_flight `,
		`outpost_policy_decisions_total\{result="allow"\} `,
		`outpost_policy_decisions_total\{result="deny"\} 1`,
		`outpost_policy_denials_total\{action="device.read",kind="device"\} 1`,
		`outpost_policy_eval_duration_seconds_count `,
		`outpost_ingest_messages_total\{result="stored"\} 1`,
		`outpost_ingest_commit_duration_seconds_count `,
		`outpost_ingest_ack_duration_seconds_count `,
		`outpost_store_readings 1`,
		`outpost_sync_backlog `,
	})

	// Admin address: pprof and the runtime log level.
	resp, err := http.Get("http://" + admin + "/debug/pprof/cmdline")
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("pprof on the admin address: %v", err)
	}
	resp.Body.Close()
	req, _ := http.NewRequest(http.MethodPut, "http://"+admin+"/debug/log-level", strings.NewReader("debug"))
	resp, err = http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("set log level: %v", err)
	}
	resp.Body.Close()
	if err := e.api(http.MethodGet, "/healthz", "", nil, nil); err != nil {
		t.Fatal(err)
	}
	waitLog(t, 5*time.Second, "debug logging of requests", e.log.String, `level=DEBUG msg=http`)
	if resp, err := http.Get("http://" + e.HTTP + "/debug/pprof/"); err == nil {
		if resp.StatusCode == http.StatusOK {
			t.Error("pprof is served on the public API port")
		}
		resp.Body.Close()
	}
}

// TestMetricsCloud scrapes a one-node cloud-sync after a write: raft state,
// term, applied index, leader changes and apply latency, and the API
// latency by route and status; pprof is on the admin address only.
func TestMetricsCloud(t *testing.T) {
	admin := cloudFreePort(t)
	c := startCloudCluster(t, 1, cloudWithArgs("-pprof", admin))
	n := c.Nodes[0]
	if code, env, err := c.api(n, http.MethodPut, "/api/v1/devices/m1/desired", map[string]any{"state": map[string]any{"mode": "eco"}}); err != nil || code != 200 {
		t.Fatalf("desired: %d %s %v", code, env.Message, err)
	}
	if code, _, _ := c.apiTok(n, http.MethodGet, "/api/v1/devices/m1", nil, "wrong-token"); code != http.StatusUnauthorized {
		t.Fatalf("bad token: %d, want 401", code)
	}
	page := scrape(t, n.URL()+"/metrics", cloudAPIToken)
	checkMetrics(t, "cloud-sync", page, []string{
		`outpost_build_info\{daemon="cloud-sync",`,
		`outpost_raft_state 2`,
		`outpost_raft_leader 1`,
		`outpost_raft_term [1-9]`,
		`outpost_raft_applied_index [1-9]`,
		`outpost_raft_commit_index [1-9]`,
		`outpost_raft_leader_changes_total [1-9]`,
		`outpost_raft_apply_duration_seconds_count [1-9]`,
		`outpost_http_requests_total\{method="PUT",route="/api/v1/devices/:id/desired",status="200"\} 1`,
		// Refused by the group's auth middleware: counted under the group.
		`outpost_http_requests_total\{method="GET",route="/api/v1",status="401"\} 1`,
		`outpost_http_request_duration_seconds_bucket\{method="PUT",route="/api/v1/devices/:id/desired",status="200",le="[^"]+"\}`,
		`outpost_http_requests_in_flight `,
	})
	resp, err := http.Get("http://" + admin + "/debug/pprof/cmdline")
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("pprof on the admin address: %v", err)
	}
	resp.Body.Close()
	if resp, err := http.Get(n.URL() + "/debug/pprof/"); err == nil {
		if resp.StatusCode == http.StatusOK {
			t.Error("pprof is served on the public API port")
		}
		resp.Body.Close()
	}
}
