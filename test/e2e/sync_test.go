package e2e

import (
	"encoding/json"
	"net/http"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// (a) The link between edge and cloud is cut while devices keep publishing.
// The edge keeps ingesting offline; after the link heals every acknowledged
// reading is on every cloud node exactly once.
func TestSyncLinkCutDuringIngest(t *testing.T) {
	c := startCloudCluster(t, 3)
	link := newSyncLink(t, c)
	e := startSyncEdge(t, "e0", link)
	devs := newEdgeDevices(4, 2500)
	load := startSyncLoad(t, e, devs, 50)

	load.waitAcks(t, 2000, 60*time.Second)
	link.cut(true)
	load.waitAcks(t, 6000, 60*time.Second)
	tok := e.login()
	st, err := e.syncStatus(tok)
	if err != nil {
		t.Fatal(err)
	}
	if st.Cloud.Backlog == 0 {
		t.Errorf("backlog 0 while the link is cut: %+v", st.Cloud)
	}
	link.cut(false)
	load.wait(t)
	waitCloudExactlyOnce(t, c, "e0", ackedIDs(devs), sentIDs(devs), 60*time.Second)
	cloudWaitFor(t, 20*time.Second, "edge reports connected with an empty backlog", func() bool {
		st, err := e.syncStatus(tok)
		return err == nil && st.Cloud.Connected && st.Cloud.Backlog == 0 && st.Cloud.LastSync != nil
	})
}

// (d) Edge and cloud both write the same device's desired state while the
// link is down. After it heals, the edge and every cloud node hold the same
// per-field last-writer-wins result (a deletion included), and the device's
// retained downlink carries it.
func TestSyncConflictingDesiredDuringPartition(t *testing.T) {
	c := startCloudCluster(t, 3, cloudWithUsers())
	link := newSyncLink(t, c)
	e := startSyncEdge(t, "e1", link)
	dev := "conflict-1"
	mq := edgeConnect(t, e.MQTT, dev)
	if tk := mq.Publish("sensors/"+dev+"/state", 1, false, []byte(`{"state":{"fw":"1.0"}}`)); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("publish state: %v", tk.Error())
	}
	cloudWaitFor(t, 20*time.Second, "the cloud knows the device's home edge", func() bool {
		d, err := c.deviceState(c.Nodes[0], dev)
		return err == nil && d.EdgeID == "e1"
	})
	// The edge's writes carry a cloud-issued token: the proof the cloud
	// needs to accept them (edge restriction).
	tok := edgeTrusts(t, c, e, "admin", dev)

	link.cut(true)
	write := func(where string, state string) {
		t.Helper()
		body := map[string]json.RawMessage{"state": json.RawMessage(state)}
		if where == "edge" {
			if err := e.api(http.MethodPut, "/api/v1/devices/"+dev+"/desired", tok, body, nil); err != nil {
				t.Fatal(err)
			}
		} else if code, env, err := c.api(c.Nodes[1], http.MethodPut, "/api/v1/devices/"+dev+"/desired", body); err != nil || code != 200 {
			t.Fatalf("cloud desired write: %d %s %v", code, env.Message, err)
		}
		// Successive writers on different machines are ordered by wall
		// time; make sure each write is in a later millisecond.
		time.Sleep(5 * time.Millisecond)
	}
	write("edge", `{"a":1,"b":1}`)
	write("cloud", `{"b":2,"c":2}`)
	write("edge", `{"c":3,"d":3}`)
	write("cloud", `{"a":null,"e":5}`)
	want := map[string]json.RawMessage{"b": json.RawMessage(`2`), "c": json.RawMessage(`3`), "d": json.RawMessage(`3`), "e": json.RawMessage(`5`)}

	// Subscribe to the retained downlink before healing.
	var mu sync.Mutex
	var last []byte
	sub := edgeConnect(t, e.MQTT, dev+"-sub")
	if tk := sub.Subscribe("devices/"+dev+"/desired", 1, func(_ paho.Client, m paho.Message) {
		mu.Lock()
		last = append([]byte(nil), m.Payload()...)
		mu.Unlock()
	}); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("subscribe: %v", tk.Error())
	}
	link.cut(false)

	var edgeState syncDeviceState
	cloudWaitFor(t, 30*time.Second, "the edge converges", func() bool {
		var err error
		edgeState, err = e.deviceState(tok, dev)
		return err == nil && sameDesired(edgeState.Desired, want)
	})
	for _, n := range c.Nodes {
		cloudWaitFor(t, 30*time.Second, n.ID+" converges to the edge's state", func() bool {
			d, err := c.deviceState(n, dev)
			return err == nil && sameDesired(d.Desired, want) && d.DesiredVersion == edgeState.DesiredVersion
		})
	}
	cloudWaitFor(t, 10*time.Second, "the retained downlink carries the merged state", func() bool {
		mu.Lock()
		defer mu.Unlock()
		var p struct {
			Version string                     `json:"version"`
			State   map[string]json.RawMessage `json:"state"`
		}
		ok := json.Unmarshal(last, &p) == nil && sameDesired(p.State, want) && p.Version == edgeState.DesiredVersion
		if !ok {
			t.Logf("downlink %s, edge %s", last, edgeState)
		}
		return ok
	})
}
