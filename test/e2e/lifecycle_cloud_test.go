package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestLifecycleCloudSIGTERM stops the leader and then a follower of a
// 3-node cluster with SIGTERM while writers keep going and a slow write is
// in flight on the node being stopped. Each node must finish that request,
// exit 0 within its grace period, and restart on its data (raft log and
// state reopen: no lock left behind); every write any node acknowledged
// must be in the state afterwards.
func TestLifecycleCloudSIGTERM(t *testing.T) {
	const grace = 6 * time.Second
	c := startCloudCluster(t, 3, cloudWithArgs("-shutdown-grace", grace.String()))

	// Writers: each write sets a field of its own; acked remembers the
	// writes a node answered 200.
	var (
		mu    sync.Mutex
		acked = map[string]string{}   // device/field → last acknowledged value
		maybe = map[string][]string{} // device/field → values tried since, outcome unknown
		seq   atomic.Int64
	)
	stop := make(chan struct{})
	stopWriters := sync.OnceFunc(func() { close(stop) })
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				n := c.Nodes[(w+i)%len(c.Nodes)] // a stopped node refuses the connection
				dev, field := fmt.Sprintf("life-%d", w), fmt.Sprintf("f%d", i%50)
				val := fmt.Sprintf("v%d", seq.Add(1))
				code, _, err := c.api(n, http.MethodPut, "/api/v1/devices/"+dev+"/desired", map[string]any{"state": map[string]any{field: val}})
				// Writes of one field are sequential (one writer per device).
				mu.Lock()
				if err == nil && code == http.StatusOK {
					acked[dev+"/"+field] = val
					delete(maybe, dev+"/"+field)
				} else {
					maybe[dev+"/"+field] = append(maybe[dev+"/"+field], val)
				}
				mu.Unlock()
			}
		}()
	}
	t.Cleanup(func() { stopWriters(); wg.Wait() })
	cloudWaitFor(t, 10*time.Second, "writes to be acknowledged", func() bool { return seq.Load() > 100 })

	sigterm := func(i int, role string) {
		t.Helper()
		n := c.Nodes[i]
		// A write caught in flight on the node being stopped.
		r := startSlowRequest(t, n.HTTP, http.MethodPut, "/api/v1/devices/inflight-"+n.ID+"/desired", cloudAPIToken,
			`{"state":{"drained":"yes","pad":"`+strings.Repeat("x", 64)+`"}}`)
		start := time.Now()
		if err := n.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		waitLog(t, 5*time.Second, n.ID+" to start shutting down", n.Log, "shutting down")
		resp, body, err := r.finish()
		if err != nil {
			t.Fatalf("%s %s: in-flight request cut by the shutdown: %v", role, n.ID, err)
		}
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s %s: in-flight request: %d %s", role, n.ID, resp.StatusCode, body)
		}
		code, took := waitExit(t, n.cmd, n.exited, grace+5*time.Second, start)
		n.running = false
		if code != 0 {
			t.Fatalf("%s %s: exit code %d after SIGTERM, want 0:\n%s", role, n.ID, code, cloudTail(n.Log(), 3000))
		}
		if took > grace {
			t.Fatalf("%s %s: took %s to stop, more than the %s grace", role, n.ID, took, grace)
		}
		t.Logf("%s %s stopped in %s", role, n.ID, took.Round(time.Millisecond))
		// The others carry on (a new leader if this was the leader).
		before := seq.Load()
		cloudWaitFor(t, 10*time.Second, "writes to continue on the other nodes", func() bool { return seq.Load() > before+50 })
		c.restart(i)
		c.waitLeader(n, 10*time.Second)
	}

	leader := c.mustLeader(10 * time.Second)
	sigterm(leader, "leader")
	follower := c.follower()
	sigterm(follower, "follower")
	stopped := []string{c.Nodes[leader].ID, c.Nodes[follower].ID}

	stopWriters()
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	for _, n := range c.Nodes {
		devs := map[string]map[string]json.RawMessage{}
		for key, val := range acked {
			dev, field, _ := strings.Cut(key, "/")
			if devs[dev] == nil {
				code, env, err := c.api(n, http.MethodGet, "/api/v1/devices/"+dev+"?consistency=strong", nil)
				if err != nil || code != http.StatusOK {
					t.Fatalf("%s: device %s: %d %v", n.ID, dev, code, err)
				}
				var d struct {
					Desired map[string]json.RawMessage `json:"desired"`
				}
				if err := json.Unmarshal(env.Data, &d); err != nil {
					t.Fatal(err)
				}
				devs[dev] = d.Desired
			}
			got := string(devs[dev][field])
			ok := got == `"`+val+`"`
			for _, v := range maybe[key] {
				ok = ok || got == `"`+v+`"`
			}
			if !ok {
				t.Fatalf("%s: %s.%s = %s, want the acknowledged %q (or a later unconfirmed %v)", n.ID, dev, field, got, val, maybe[key])
			}
		}
	}
	for _, id := range stopped {
		code, env, err := c.api(c.Nodes[0], http.MethodGet, "/api/v1/devices/inflight-"+id+"?consistency=strong", nil)
		if err != nil || code != http.StatusOK || !strings.Contains(string(env.Data), `"drained":"yes"`) {
			t.Fatalf("the in-flight write on %s is not in the state: %d %s %v", id, code, env.Data, err)
		}
	}
	t.Logf("%d writes issued, %d fields checked on every node", seq.Load(), len(acked))
}
