package e2e

import (
	"encoding/json"
	"net/http"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// A desired-state write in the cloud reaches the device through a
// long-polling edge within a couple of seconds: the edge talks only to a
// follower, which forwards its held pull to the leader, and the leader
// answers the held pull as soon as the write commits. The leader's
// held-pulls gauge shows the edge is long-polling, not polling. Stopping the
// leader is not delayed by the held pull (it is answered at once), and the
// edge's next held pull, on the new leader, brings the next write.
func TestSyncLongPollDesiredReachesDevice(t *testing.T) {
	c := startCloudCluster(t, 3)
	leader := c.mustLeader(10 * time.Second)
	follower := c.follower()
	link := &syncLink{proxies: []*cloudProxy{startCloudProxy(t, c.Nodes[follower].HTTP)}}
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
	cloudWaitFor(t, 30*time.Second, "the edge's pull is held by the leader", func() bool {
		v, ok := c.metric(c.Nodes[leader], "outpost_cloud_pulls_held")
		return ok && v >= 1
	})

	body := map[string]json.RawMessage{"state": json.RawMessage(`{"fan":"on"}`)}
	start := time.Now()
	if code, env, err := c.api(c.Nodes[leader], http.MethodPut, "/api/v1/devices/"+dev+"/desired", body); err != nil || code != 200 {
		t.Fatalf("cloud desired write: %d %s %v", code, env.Message, err)
	}
	waitDesired(t, got, "on", start, 3*time.Second)

	// SIGTERM the leader while it holds the edge's pull: it exits at once,
	// not after the 25s hold.
	cloudWaitFor(t, 30*time.Second, "the edge's pull is held again", func() bool {
		v, ok := c.metric(c.Nodes[leader], "outpost_cloud_pulls_held")
		return ok && v >= 1
	})
	stopped := time.Now()
	c.stop(leader)
	if d := time.Since(stopped); d > 10*time.Second {
		t.Fatalf("the leader took %s to stop with a held pull", d)
	}
	next := c.mustLeader(20 * time.Second)
	body = map[string]json.RawMessage{"state": json.RawMessage(`{"fan":"off"}`)}
	cloudWaitFor(t, 20*time.Second, "a desired write on the new leader", func() bool {
		code, _, err := c.api(c.Nodes[next], http.MethodPut, "/api/v1/devices/"+dev+"/desired", body)
		return err == nil && code == 200
	})
	waitDesired(t, got, "off", time.Now(), 15*time.Second)
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
