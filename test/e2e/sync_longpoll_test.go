package e2e

import (
	"encoding/json"
	"net/http"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// A desired-state write in the cloud reaches the device through a
// long-polling edge within a couple of seconds, both when the edge's pull is
// held by a follower (on its own replica, then forwarded to the leader) and
// when the leader holds it; the nodes' held-pulls gauges show the edge is
// long-polling, not polling. Stopping a node is not delayed by the pull it
// holds: the edge moves on to the next node.
func TestSyncLongPollDesiredReachesDevice(t *testing.T) {
	c := startCloudCluster(t, 3)
	leader := c.mustLeader(10 * time.Second)
	follower := c.follower()
	link := &syncLink{proxies: []*cloudProxy{startCloudProxy(t, c.Nodes[follower].HTTP), startCloudProxy(t, c.Nodes[leader].HTTP)}}
	e := startSyncEdge(t, "e1", link)
	dev := "lp-1"
	mq := edgeConnect(t, e.MQTT, dev)
	if tk := mq.Publish("sensors/"+dev+"/state", 1, false, []byte(`{"state":{"fw":"1.0"}}`)); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("publish state: %v", tk.Error())
	}
	cloudWaitFor(t, 20*time.Second, "the cloud knows the device's home edge", func() bool {
		d, err := c.deviceState(c.Nodes[leader], dev)
		return err == nil && d.EdgeID == "e1"
	})

	got := make(chan map[string]json.RawMessage, 16)
	sub := edgeConnect(t, e.MQTT, dev+"-sub")
	if tk := sub.Subscribe("devices/"+dev+"/desired", 1, func(_ paho.Client, m paho.Message) {
		var p struct {
			State map[string]json.RawMessage `json:"state"`
		}
		if json.Unmarshal(m.Payload(), &p) == nil {
			got <- p.State
		}
	}); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("subscribe: %v", tk.Error())
	}
	held := func(i int, who string) {
		t.Helper()
		cloudWaitFor(t, 30*time.Second, "the edge's pull held by the "+who, func() bool {
			v, ok := c.metric(c.Nodes[i], "outpost_cloud_pulls_held")
			return ok && v >= 1
		})
	}
	write := func(val string) time.Time {
		t.Helper()
		body := map[string]json.RawMessage{"state": json.RawMessage(`{"fan":"` + val + `"}`)}
		start := time.Now()
		if code, env, err := c.api(c.Nodes[leader], http.MethodPut, "/api/v1/devices/"+dev+"/desired", body); err != nil || code != 200 {
			t.Fatalf("cloud desired write: %d %s %v", code, env.Message, err)
		}
		return start
	}
	stop := func(i int, who string) {
		t.Helper()
		start := time.Now()
		c.stop(i)
		if d := time.Since(start); d > 10*time.Second {
			t.Fatalf("the %s took %s to stop while holding a pull", who, d)
		}
	}

	// Held by the follower the edge talks to.
	held(follower, "follower")
	waitDesired(t, got, "on", write("on"), 3*time.Second)
	// The follower stops at once; the edge moves on to the leader, which
	// holds its pull.
	held(follower, "follower")
	stop(follower, "follower")
	held(leader, "leader")
	waitDesired(t, got, "off", write("off"), 3*time.Second)
	stop(leader, "leader")
}

// waitDesired waits for the device's downlink to carry fan=want, and fails
// if it came later than within after start.
func waitDesired(t *testing.T, got <-chan map[string]json.RawMessage, want string, start time.Time, within time.Duration) {
	t.Helper()
	deadline := time.After(within + 10*time.Second)
	for {
		select {
		case st := <-got:
			if string(st["fan"]) != `"`+want+`"` {
				continue // an earlier message
			}
			d := time.Since(start)
			if d > within {
				t.Fatalf("fan=%s reached the device after %s, want within %s", want, d, within)
			}
			t.Logf("cloud write fan=%s → device: %s", want, d.Round(time.Millisecond))
			return
		case <-deadline:
			t.Fatalf("fan=%s did not reach the device", want)
		}
	}
}
