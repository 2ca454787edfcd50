package e2e

import (
	"encoding/json"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

func toSet(ids ...[]string) map[string]bool {
	m := map[string]bool{}
	for _, l := range ids {
		for _, id := range l {
			m[id] = true
		}
	}
	return m
}

// (b) kill -9 of the cloud leader while an edge drains a backlog: the edge
// fails over to the new leader and every reading ends up on every node
// (the killed one too, after it restarts) exactly once.
func TestSyncLeaderKilledDuringDrain(t *testing.T) {
	c := startCloudCluster(t, 3)
	link := newSyncLink(t, c)
	link.cut(true)
	e := startSyncEdge(t, "e4", link, "-cloud-batch-readings", "1000")
	var ids []string
	for d := 0; d < 4; d++ {
		ids = append(ids, bulkPublish(t, e, "drain-"+string(rune('a'+d)), 0, 10000, 100)...)
	}
	lead := c.mustLeader(10 * time.Second)
	link.cut(false)
	cloudWaitFor(t, 30*time.Second, "the drain is under way", func() bool {
		seq, _ := c.edgeAcked(c.Nodes[lead], "e4")
		return seq > 0
	})
	c.kill(lead)
	if seq, _ := e.metric("outpost_sync_acked_seq"); seq >= 400 {
		t.Logf("warning: the drain finished (acked %v) before the leader was killed", seq)
	}
	waitCloudExactlyOnce(t, c, "e4", ids, toSet(ids), 60*time.Second)
	c.restart(lead)
	waitCloudExactlyOnce(t, c, "e4", ids, toSet(ids), 60*time.Second)
}

// (c) kill -9 of the edge after the cloud acknowledged a push but before the
// edge recorded the ack: on restart the edge learns the cloud's sequence,
// truncates its outbox to it, and resends nothing the cloud already has.
func TestSyncEdgeKilledBeforeRecordingAck(t *testing.T) {
	c := startCloudCluster(t, 1)
	link := newSyncLink(t, c)
	link.cut(true)
	e := startSyncEdge(t, "e5", link, "-cloud-batch-readings", "500", "-unsafe-crash-after-push", "3")
	ids := bulkPublish(t, e, "crashy", 0, 5000, 100)
	link.cut(false)
	select {
	case <-e.exited:
	case <-time.After(30 * time.Second):
		t.Fatal("edge did not kill itself after its third acknowledged push")
	}
	if !strings.Contains(e.log.String(), "killing the process between the cloud's ack and recording it") {
		t.Fatal("edge exited, but not at the crash point")
	}
	acked, _ := c.edgeAcked(c.Nodes[0], "e5")
	if acked == 0 {
		t.Fatal("the cloud acknowledged nothing before the crash")
	}
	// Restart without the crash hook on the same data.
	e.args = []string{"-id", "e5", "-cloud", link.urls(), "-cloud-token", cloudEdgeToken("e5"), "-unsafe-no-fsync"}
	e.start()
	waitCloudExactlyOnce(t, c, "e5", ids, toSet(ids), 60*time.Second)
	tok := e.login()
	cloudWaitFor(t, 20*time.Second, "backlog drained", func() bool {
		st, err := e.syncStatus(tok)
		return err == nil && st.Cloud.Backlog == 0
	})
	if n := strings.Count(e.log.String(), "cloud already held changes the outbox had not recorded"); n != 1 {
		t.Errorf("restart reconciled with the cloud's ack %d times, want 1", n)
	}
}

// (e) An edge whose clock runs an hour ahead. Expected outcome: its readings
// (device timestamps, no HLC judgement) all sync exactly once; the state
// fields it stamps an hour ahead are rejected by the cloud and counted, not
// stored, so they cannot win every later merge; the edge sees its offset;
// and a desired write made in the cloud still reaches the edge (its stamp is
// in the edge's past, which the edge accepts).
func TestSyncEdgeClockAhead(t *testing.T) {
	c := startCloudCluster(t, 1)
	link := newSyncLink(t, c)
	e := startSyncEdge(t, "e6", link, "-unsafe-clock-offset", "1h")
	ids := bulkPublish(t, e, "skewed", 0, 2000, 100)
	mq := edgeConnect(t, e.MQTT, "skewed-state")
	if tk := mq.Publish("sensors/skewed/state", 1, false, []byte(`{"state":{"fw":"9.9"}}`)); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatal(tk.Error())
	}
	waitCloudExactlyOnce(t, c, "e6", ids, toSet(ids), 30*time.Second)
	cloudWaitFor(t, 20*time.Second, "the cloud counts the rejected stamps", func() bool {
		v, _ := c.labelled(c.Nodes[0], `outpost_cloud_rejected_stamps_total{edge="e6"}`)
		return v >= 1
	})
	d, err := c.deviceState(c.Nodes[0], "skewed")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := d.Reported["fw"]; ok {
		t.Errorf("the cloud stored a field stamped an hour ahead: %v", d.Reported)
	}
	cloudWaitFor(t, 20*time.Second, "the edge sees its clock offset", func() bool {
		off, ok := e.metric("outpost_sync_clock_offset_seconds")
		return ok && off > 3500 && off < 3700
	})
	if code, env, err := c.api(c.Nodes[0], http.MethodPut, "/api/v1/devices/skewed/desired", map[string]any{"state": map[string]any{"mode": "eco"}}); err != nil || code != 200 {
		t.Fatalf("cloud desired: %d %s %v", code, env.Message, err)
	}
	tok := e.login()
	cloudWaitFor(t, 20*time.Second, "the cloud's desired write reaches the fast edge", func() bool {
		s, err := e.deviceState(tok, "skewed")
		return err == nil && string(s.Desired["mode"]) == `"eco"`
	})
}

// (f) The link flaps every one to three seconds for a minute while devices
// publish: the edge's push cursor and every node's view of the edge's
// sequence never move backwards, and nothing is lost or duplicated.
func TestSyncFlappingLink(t *testing.T) {
	c := startCloudCluster(t, 3)
	link := newSyncLink(t, c)
	e := startSyncEdge(t, "e7", link)
	devs := newEdgeDevices(2, 4000)
	load := startSyncLoad(t, e, devs, 2)

	stop := make(chan struct{})
	var mon sync.WaitGroup
	var monErr []string
	var monMu sync.Mutex
	mon.Add(1)
	go func() {
		defer mon.Done()
		var lastEdge float64
		lastNode := map[string]uint64{}
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			if v, ok := e.metric("outpost_sync_acked_seq"); ok {
				if v < lastEdge {
					monMu.Lock()
					monErr = append(monErr, "edge cursor moved backwards")
					monMu.Unlock()
				}
				lastEdge = v
			}
			for _, n := range c.Nodes {
				if s, ok := c.edgeAcked(n, "e7"); ok {
					if s < lastNode[n.ID] {
						monMu.Lock()
						monErr = append(monErr, n.ID+" sequence moved backwards")
						monMu.Unlock()
					}
					lastNode[n.ID] = s
				}
			}
		}
	}()
	end := time.Now().Add(time.Minute)
	for up := true; time.Now().Before(end); up = !up {
		link.cut(!up)
		time.Sleep(time.Second + time.Duration(rand.Int64N(int64(2*time.Second)))) // the flapping schedule itself
	}
	link.cut(false)
	close(load.stop)
	load.wg.Wait()
	close(stop)
	mon.Wait()
	if len(monErr) > 0 {
		t.Fatalf("%d monotonicity violations, first: %s", len(monErr), monErr[0])
	}
	acked := ackedIDs(devs)
	if len(acked) < 500 {
		t.Fatalf("only %d publishes acknowledged in a minute", len(acked))
	}
	waitCloudExactlyOnce(t, c, "e7", acked, sentIDs(devs), 60*time.Second)
}

// (g) A device moves from one edge to another. The cloud holds both parts of
// its history, each reading once and attributed to the edge that received
// it, and its reported state merges to the later write.
func TestSyncDeviceMovesBetweenEdges(t *testing.T) {
	c := startCloudCluster(t, 1)
	a := startSyncEdge(t, "e2", newSyncLink(t, c))
	b := startSyncEdge(t, "e3", newSyncLink(t, c))
	first := bulkPublish(t, a, "nomad", 0, 1000, 50)
	state := func(e *edgeProc, loc string) {
		cl := edgeConnect(t, e.MQTT, "nomad")
		defer cl.Disconnect(0)
		if tk := cl.Publish("sensors/nomad/state", 1, false, []byte(`{"state":{"loc":"`+loc+`"}}`)); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
			t.Fatal(tk.Error())
		}
	}
	state(a, "A")
	time.Sleep(5 * time.Millisecond) // the move happens later in wall time
	second := bulkPublish(t, b, "nomad", 1000, 1000, 50)
	state(b, "B")
	waitCloudExactlyOnce(t, c, "e2", first, toSet(first), 30*time.Second)
	waitCloudExactlyOnce(t, c, "e3", second, toSet(second), 30*time.Second)

	// The device's merged history, in time order, from the consumer API.
	var got []string
	cursor := ""
	for {
		code, env, err := c.api(c.Nodes[0], http.MethodGet, "/api/v1/devices/nomad/readings?limit=1000&cursor="+cursor, nil)
		if err != nil || code != 200 {
			t.Fatalf("readings: %d %s %v", code, env.Message, err)
		}
		var page struct {
			Items []struct {
				ID   string `json:"id"`
				Edge string `json:"edge"`
			} `json:"items"`
			Next string `json:"next_cursor"`
		}
		if err := json.Unmarshal(env.Data, &page); err != nil {
			t.Fatal(err)
		}
		for _, it := range page.Items {
			got = append(got, it.Edge+"/"+it.ID)
		}
		if page.Next == "" {
			break
		}
		cursor = page.Next
	}
	if len(got) != 2000 || !strings.HasPrefix(got[0], "e2/nomad-000000") || !strings.HasPrefix(got[1999], "e3/nomad-001999") {
		t.Fatalf("merged history has %d readings (first %v, last %v), want 2000 from e2 then e3", len(got), got[:min(1, len(got))], got[max(0, len(got)-1):])
	}
	cloudWaitFor(t, 20*time.Second, "reported state merges to the later write", func() bool {
		d, err := c.deviceState(c.Nodes[0], "nomad")
		return err == nil && string(d.Reported["loc"]) == `"B"`
	})
}
