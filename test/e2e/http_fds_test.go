package e2e

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// fdLimit is the descriptor limit (soft and hard) the daemons run under.
const fdLimit = 256

// TestEdgeSurvivesFullFDTable: Finding 6: the edge exited (code 1, no
// reason logged) when accept() failed with EMFILE. Run under a low
// RLIMIT_NOFILE and flooded with connections, it keeps running, logs the
// accept failures once per burst, counts them, and serves again once the
// flood ends.
func TestEdgeSurvivesFullFDTable(t *testing.T) {
	dir := t.TempDir()
	httpAddr := edgeFreeAddr(t)
	survivesFullFDTable(t, edgeBinary(t), httpAddr, "", "-id", "fd-e2e", "-data", filepath.Join(dir, "data"),
		"-http", httpAddr, "-mqtt-listen", edgeFreeAddr(t), "-policies", filepath.Join(dir, "policies"))
}

// TestCloudSurvivesFullFDTable: Finding 6, for cloud-sync.
func TestCloudSurvivesFullFDTable(t *testing.T) {
	httpAddr := cloudFreePort(t)
	const token = "fd-e2e-api-token-0123456789abcdef" // cloud-sync's /metrics needs a credential
	survivesFullFDTable(t, buildCloudSync(t), httpAddr, token, "-id", "n1", "-bootstrap", "-data", t.TempDir(),
		"-http", httpAddr, "-raft", cloudFreePort(t), "-api-token", token)
}

// survivesFullFDTable runs bin with args under the low descriptor limit;
// metricsToken is the bearer token its /metrics needs ("" for none).
func survivesFullFDTable(t *testing.T, bin, httpAddr, metricsToken string, args ...string) {
	t.Helper()
	prlimit, err := exec.LookPath("prlimit")
	if err != nil {
		t.Skip("prlimit (util-linux) not installed")
	}
	log := &edgeLog{}
	cmd := exec.Command(prlimit, append([]string{fmt.Sprintf("--nofile=%d:%d", fdLimit, fdLimit), "--", bin}, args...)...)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			t.Errorf("the daemon (pid %d) did not exit when killed", cmd.Process.Pid)
		}
		if t.Failed() {
			t.Logf("daemon output:\n%s", edgeTail(log.String(), 100))
		}
	})
	base := "http://" + httpAddr
	healthy := func() bool {
		hc := &http.Client{Timeout: time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
		resp, err := hc.Get(base + "/healthz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	}
	waitUp := func(what string) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for !healthy() {
			select {
			case err := <-exited:
				t.Fatalf("%s: the daemon exited: %v", what, err)
			default:
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: not serving", what)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitUp("start")

	// More connections than descriptors are left: accept fails with EMFILE
	// once the table is full (the kernel's backlog holds the rest).
	open := 0
	if ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", cmd.Process.Pid)); err == nil {
		open = len(ents)
	}
	var flood []net.Conn
	for range fdLimit - open + 64 {
		c, err := net.DialTimeout("tcp", httpAddr, time.Second)
		if err != nil {
			break
		}
		flood = append(flood, c)
	}
	// Give the accept loop time to hit the limit and back off.
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(log.String(), "accept failed; retrying with backoff") {
		select {
		case err := <-exited:
			t.Fatalf("the daemon exited under a full descriptor table: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no accept failure logged after %d connections (%d descriptors open at start)", len(flood), open)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, c := range flood {
		c.Close()
	}
	waitUp("after the flood")
	// Once per burst (pkg/netlimit's test counts exactly): a few bursts
	// while the flood drains, not a line per failed accept.
	if n := strings.Count(log.String(), "accept failed; retrying with backoff"); n > 10 {
		t.Errorf("the accept failure was logged %d times; want once per burst", n)
	}

	page := scrape(t, base+"/metrics", metricsToken)
	m := regexp.MustCompile(`(?m)^outpost_http_accept_errors_total (\S+)$`).FindStringSubmatch(page)
	if m == nil {
		t.Fatal("no outpost_http_accept_errors_total on /metrics")
	}
	if v, _ := strconv.ParseFloat(m[1], 64); v < 1 {
		t.Fatalf("outpost_http_accept_errors_total = %s, want ≥ 1", m[1])
	}
}
