package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestLifecycleEdgeSIGTERM stops an edge under load with SIGTERM: MQTT
// publishers running and slow API writes in flight. The edge must finish
// the in-flight requests (200, not a reset), exit 0 within its grace
// period, and on the next start (the bbolt files reopen: no lock left
// behind) hold every message it acknowledged, exactly once, and every
// desired write it answered.
func TestLifecycleEdgeSIGTERM(t *testing.T) {
	const grace = 8 * time.Second
	e := startEdge(t, "-shutdown-grace", grace.String())
	token := e.login()

	// MQTT load: devices publish until the connection goes away.
	const perDevice = 100000
	devs := newEdgeDevices(4, perDevice)
	acks := newEdgeAcks(400)
	stop := make(chan struct{})
	stopPublishers := sync.OnceFunc(func() { close(stop) })
	var wg sync.WaitGroup
	for _, d := range devs {
		c := edgeConnect(t, e.MQTT, "lifecycle-"+d.name)
		idx := make([]int, perDevice)
		for i := range idx {
			idx[i] = i
		}
		wg.Add(1)
		go func() { defer wg.Done(); _ = edgePublish(c, d, idx, 8, acks, stop) }()
	}
	t.Cleanup(func() { stopPublishers(); wg.Wait() })
	select {
	case <-acks.reached:
	case <-time.After(20 * time.Second):
		t.Fatalf("only %d acks after 20s", acks.n.Load())
	}

	// Slow API writes, caught in flight: headers and half the body sent.
	var slow []*slowRequest
	for i, d := range devs {
		body := fmt.Sprintf(`{"state":{"mode":"drain-%d","pad":"%s"}}`, i, strings.Repeat("x", 64))
		slow = append(slow, startSlowRequest(t, e.HTTP, http.MethodPut, "/api/v1/devices/"+d.name+"/desired", token, body))
	}

	// Closing the listener resets connections still in the kernel's accept
	// backlog. One complete request on a new connection afterwards proves
	// the server accepted the slow ones (accept is FIFO) before the signal.
	probe := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}
	if resp, err := probe.Get("http://" + e.HTTP + "/healthz"); err != nil {
		t.Fatalf("probe before SIGTERM: %v", err)
	} else {
		resp.Body.Close()
	}

	start := time.Now()
	if err := e.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitLog(t, 5*time.Second, "the edge to start shutting down", e.log.String, "shutting down")
	// The server has stopped accepting; the requests it holds still finish.
	for i, r := range slow {
		resp, body, err := r.finish()
		if err != nil {
			t.Fatalf("in-flight request %d was cut by the shutdown: %v", i, err)
		}
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("in-flight request %d: %d %s", i, resp.StatusCode, body)
		}
	}
	if _, err := http.Get("http://" + e.HTTP + "/healthz"); err == nil {
		t.Error("the edge still accepts HTTP connections while shutting down")
	}
	code, took := waitExit(t, e.cmd, e.exited, grace+5*time.Second, start)
	if code != 0 {
		t.Fatalf("exit code %d after SIGTERM, want 0", code)
	}
	if took > grace {
		t.Fatalf("took %s to stop, more than the %s grace", took, grace)
	}
	if !strings.Contains(e.log.String(), "edge stopped cleanly") {
		t.Fatal(`no "edge stopped cleanly" in the log`)
	}
	t.Logf("stopped in %s with %d messages acknowledged", took.Round(time.Millisecond), acks.n.Load())

	// The publishers see their connections close; let them settle.
	stopPublishers()
	wg.Wait()

	// Restart on the same data: bbolt opens (start waits for /readyz).
	e.start()
	token = e.login()
	for i, d := range devs {
		ids := e.readingIDs(token, d.name)
		for k := range d.acked {
			if !d.acked[k].Load() {
				continue
			}
			if n := ids[d.msgID(k)]; n != 1 {
				t.Fatalf("%s: acknowledged message stored %d times after SIGTERM and restart", d.msgID(k), n)
			}
		}
		var dev struct {
			Desired map[string]json.RawMessage `json:"desired"`
		}
		if err := e.api(http.MethodGet, "/api/v1/devices/"+d.name, token, nil, &dev); err != nil {
			t.Fatal(err)
		}
		if got := string(dev.Desired["mode"]); got != fmt.Sprintf(`"drain-%d"`, i) {
			t.Fatalf("%s: desired mode %s after restart, want the in-flight write drain-%d", d.name, got, i)
		}
	}
}
