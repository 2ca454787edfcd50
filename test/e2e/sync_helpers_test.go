package e2e

// Helpers for the edge↔cloud sync fault tests: a cuttable TCP link between
// an edge and every cloud node, an edge joined to a cluster, continuous MQTT
// load with a ledger, and exact per-node accounting of what the cloud holds.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/outpost-edge/outpost/internal/benchproc"
)

// syncLink is the network between one edge and the cloud: a TCP proxy in
// front of each cloud node's HTTP port. Cutting it closes every live
// connection and refuses new ones, like a pulled cable.
type syncLink struct {
	proxies []*cloudProxy
}

func newSyncLink(t *testing.T, c *cloudCluster) *syncLink {
	t.Helper()
	l := &syncLink{}
	for _, n := range c.Nodes {
		l.proxies = append(l.proxies, startCloudProxy(t, n.HTTP))
	}
	return l
}

func (l *syncLink) urls() string {
	var u []string
	for _, p := range l.proxies {
		u = append(u, "http://"+p.Addr())
	}
	return strings.Join(u, ",")
}

func (l *syncLink) cut(cut bool) {
	for _, p := range l.proxies {
		p.Cut(cut)
	}
}

// startSyncEdge starts edge id joined to the cluster through link.
func startSyncEdge(t *testing.T, id string, link *syncLink, extra ...string) *edgeProc {
	t.Helper()
	args := append([]string{"-id", id, "-cloud", link.urls(), "-cloud-token", cloudEdgeToken(id), "-unsafe-no-fsync"}, extra...)
	return startEdge(t, args...)
}

// syncEdgeStatus is the cloud part of an edge's GET /api/v1/edge.
type syncEdgeStatus struct {
	Cloud struct {
		Configured bool   `json:"configured"`
		Connected  bool   `json:"connected"`
		LastSync   *int64 `json:"last_sync"`
		Backlog    uint64 `json:"backlog"`
		OldestAge  *int64 `json:"oldest_unsynced_age_ms"`
	} `json:"cloud"`
}

func (e *edgeProc) syncStatus(token string) (syncEdgeStatus, error) {
	var st syncEdgeStatus
	err := e.api(http.MethodGet, "/api/v1/edge", token, nil, &st)
	return st, err
}

// cloudReadingIDs returns, for node n's local replica, how many times each
// reading id of edge (all edges if "") was committed, from the export log
// (which records each reading once, when first applied).
func cloudReadingIDs(t *testing.T, c *cloudCluster, n *cloudNode, edge string) (map[string]int, error) {
	t.Helper()
	out := map[string]int{}
	cursor := ""
	for {
		req, _ := http.NewRequest(http.MethodGet, n.URL()+"/api/v1/export?limit=10000&since="+cursor, nil)
		req.Header.Set("Authorization", "Bearer "+cloudAPIToken)
		resp, err := c.hc.Do(req)
		if err != nil {
			return nil, err
		}
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return nil, fmt.Errorf("export from %s: %d %s", n.ID, resp.StatusCode, raw)
		}
		lines := 0
		dec := json.NewDecoder(bytes.NewReader(raw))
		for dec.More() {
			var r cloudExportRecord
			if err := dec.Decode(&r); err != nil {
				return nil, err
			}
			lines++
			if edge != "" && r.Edge != edge {
				continue
			}
			for _, rd := range r.Readings {
				out[rd.ID]++
			}
		}
		next := resp.Header.Get("X-Outpost-Next-Cursor")
		if lines == 0 || next == cursor {
			return out, nil
		}
		cursor = next
	}
}

// ackedIDs lists the message ids whose publish the edge acknowledged.
func ackedIDs(devs []*edgeDevice) []string {
	var ids []string
	for _, d := range devs {
		for i := range d.acked {
			if d.acked[i].Load() {
				ids = append(ids, d.msgID(i))
			}
		}
	}
	return ids
}

// sentIDs lists every id handed to a client (acked or not): the only ids
// the cloud may hold.
func sentIDs(devs []*edgeDevice) map[string]bool {
	out := map[string]bool{}
	for _, d := range devs {
		for i := 0; i < int(d.sent.Load()); i++ {
			out[d.msgID(i)] = true
		}
	}
	return out
}

// waitCloudExactlyOnce waits until every running node holds every id in want
// and then checks that no id is held twice or was never sent.
func waitCloudExactlyOnce(t *testing.T, c *cloudCluster, edge string, want []string, sent map[string]bool, d time.Duration) {
	t.Helper()
	for _, n := range c.Nodes {
		if !n.running {
			continue
		}
		var got map[string]int
		var missing []string
		deadline := time.Now().Add(d)
		for {
			var err error
			got, err = cloudReadingIDs(t, c, n, edge)
			missing = missing[:0]
			if err == nil {
				for _, id := range want {
					if got[id] == 0 {
						missing = append(missing, id)
					}
				}
				if len(missing) == 0 {
					break
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: after %s, %d of %d acknowledged readings missing (first: %v; err %v)", n.ID, d, len(missing), len(want), missing[:min(5, len(missing))], err)
			}
			time.Sleep(100 * time.Millisecond)
		}
		for id, k := range got {
			if k != 1 {
				t.Errorf("%s: reading %s committed %d times", n.ID, id, k)
			}
			if sent != nil && !sent[id] {
				t.Errorf("%s: reading %s was never published", n.ID, id)
			}
		}
	}
}

// syncLoad publishes perDevice messages for each device in the background
// (window in flight each), reconnecting a device whose connection dropped.
type syncLoad struct {
	devs []*edgeDevice
	acks *edgeAcks
	wg   sync.WaitGroup
	stop chan struct{}
	errs chan error
}

func startSyncLoad(t *testing.T, e *edgeProc, devs []*edgeDevice, window int) *syncLoad {
	t.Helper()
	l := &syncLoad{devs: devs, acks: newEdgeAcks(0), stop: make(chan struct{}), errs: make(chan error, len(devs))}
	for _, d := range devs {
		cl := edgeConnect(t, e.MQTT, d.name)
		idx := make([]int, len(d.acked))
		for i := range idx {
			idx[i] = i
		}
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			if err := edgePublish(cl, d, idx, window, l.acks, l.stop); err != nil {
				l.errs <- fmt.Errorf("%s: %w", d.name, err)
			}
		}()
	}
	t.Cleanup(func() {
		select {
		case <-l.stop:
		default:
			close(l.stop)
		}
		l.wg.Wait()
	})
	return l
}

func (l *syncLoad) wait(t *testing.T) {
	t.Helper()
	l.wg.Wait()
	select {
	case err := <-l.errs:
		t.Fatal(err)
	default:
	}
}

func (l *syncLoad) waitAcks(t *testing.T, n int64, d time.Duration) {
	t.Helper()
	cloudWaitFor(t, d, fmt.Sprintf("%d publishes acknowledged", n), func() bool { return l.acks.n.Load() >= n })
}

// syncDeviceState is the desired state of a device as an edge or a cloud
// node shows it.
type syncDeviceState struct {
	EdgeID         string                     `json:"edge_id"`
	Desired        map[string]json.RawMessage `json:"desired"`
	DesiredVersion string                     `json:"desired_version"`
	Reported       map[string]json.RawMessage `json:"reported"`
}

func (s syncDeviceState) String() string {
	b, _ := json.Marshal(s.Desired)
	return fmt.Sprintf("desired %s @%s", b, s.DesiredVersion)
}

func (e *edgeProc) deviceState(token, id string) (syncDeviceState, error) {
	var d syncDeviceState
	err := e.api(http.MethodGet, "/api/v1/devices/"+id, token, nil, &d)
	return d, err
}

func (c *cloudCluster) deviceState(n *cloudNode, id string) (syncDeviceState, error) {
	var d syncDeviceState
	code, env, err := c.api(n, http.MethodGet, "/api/v1/devices/"+id, nil)
	if err != nil {
		return d, err
	}
	if code != 200 {
		return d, fmt.Errorf("%s: GET device %s: %d %s", n.ID, id, code, env.Message)
	}
	return d, json.Unmarshal(env.Data, &d)
}

// sameDesired compares desired states field by field (JSON-normalised).
func sameDesired(a, b map[string]json.RawMessage) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		w, ok := b[k]
		if !ok || !jsonEqual(v, w) {
			return false
		}
	}
	return true
}

func jsonEqual(a, b []byte) bool {
	var x, y any
	if json.Unmarshal(a, &x) != nil || json.Unmarshal(b, &y) != nil {
		return false
	}
	xa, _ := json.Marshal(x)
	ya, _ := json.Marshal(y)
	return bytes.Equal(xa, ya)
}

// bulkPublish publishes n readings of device dev as arrays of per readings
// (ids dev-000000…, ts base+i) and returns their ids. It fails the test on
// any error: the edge is not killed while it runs.
func bulkPublish(t *testing.T, e *edgeProc, dev string, from, n, per int) []string {
	t.Helper()
	cl := edgeConnect(t, e.MQTT, dev)
	defer cl.Disconnect(0)
	base := time.Now().Add(-2 * time.Hour).UnixMilli()
	var ids []string
	var toks []paho.Token
	for i := from; i < from+n; i += per {
		var b bytes.Buffer
		b.WriteByte('[')
		for j := i; j < min(i+per, from+n); j++ {
			if j > i {
				b.WriteByte(',')
			}
			id := fmt.Sprintf("%s-%06d", dev, j)
			ids = append(ids, id)
			fmt.Fprintf(&b, `{"ts":%d,"id":%q,"metrics":{"v":%d}}`, base+int64(j), id, j)
		}
		b.WriteByte(']')
		toks = append(toks, cl.Publish("sensors/"+dev+"/telemetry", 1, false, b.Bytes()))
		if len(toks) == 32 {
			for _, tk := range toks {
				if !tk.WaitTimeout(30*time.Second) || tk.Error() != nil {
					t.Fatalf("bulk publish %s: %v", dev, tk.Error())
				}
			}
			toks = toks[:0]
		}
	}
	for _, tk := range toks {
		if !tk.WaitTimeout(30*time.Second) || tk.Error() != nil {
			t.Fatalf("bulk publish %s: %v", dev, tk.Error())
		}
	}
	return ids
}

// edgeMetric reads one un-labelled sample from an edge's /metrics.
func (e *edgeProc) metric(name string) (float64, bool) {
	m, err := benchproc.Scrape(edgeHTTP, "http://"+e.HTTP+"/metrics")
	if err != nil {
		return 0, false
	}
	return m.Value(name)
}

// cloudEdgeAcked is the sequence node n's replica holds for edge.
func (c *cloudCluster) edgeAcked(n *cloudNode, edge string) (uint64, bool) {
	code, env, err := c.api(n, http.MethodGet, "/api/v1/edges", nil)
	if err != nil || code != 200 {
		return 0, false
	}
	var page struct {
		Items []struct {
			ID       string `json:"id"`
			AckedSeq uint64 `json:"acked_seq"`
			LagMs    int64  `json:"lag_ms"`
		} `json:"items"`
	}
	if json.Unmarshal(env.Data, &page) != nil {
		return 0, false
	}
	for _, it := range page.Items {
		if it.ID == edge {
			return it.AckedSeq, true
		}
	}
	return 0, true
}
