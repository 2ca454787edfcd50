package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outpost-edge/outpost/internal/natstest"
)

// sinkStatus is one item of GET /api/v1/sinks.
type sinkStatus struct {
	Name       string `json:"name"`
	Active     bool   `json:"active"`
	Cursor     uint64 `json:"cursor"`
	LagRecords int    `json:"lag_records"`
	LagEntries int    `json:"lag_entries"`
	Published  uint64 `json:"published"`
	LastError  string `json:"last_error"`
}

func (c *cloudCluster) sinks(n *cloudNode, query string) (node string, items map[string]sinkStatus, err error) {
	code, env, err := c.api(n, http.MethodGet, "/api/v1/sinks"+query, nil)
	if err != nil {
		return "", nil, err
	}
	if code != 200 {
		return "", nil, fmt.Errorf("sinks: %d %s", code, env.Message)
	}
	var body struct {
		Node  string       `json:"node"`
		Items []sinkStatus `json:"items"`
	}
	if err := json.Unmarshal(env.Data, &body); err != nil {
		return "", nil, err
	}
	items = map[string]sinkStatus{}
	for _, s := range body.Items {
		items[s.Name] = s
	}
	return body.Node, items, nil
}

// exportLine is one NDJSON line of GET /api/v1/export, as sent.
type exportLine struct {
	Cursor string
	Line   []byte
	Device string
}

// exportLines reads the whole export stream from n (leader-confirmed), each
// line's bytes as served.
func (c *cloudCluster) exportLines(n *cloudNode) []exportLine {
	c.t.Helper()
	var out []exportLine
	cursor := ""
	for {
		req, _ := http.NewRequest(http.MethodGet, n.URL()+"/api/v1/export?consistency=strong&limit=10000&since="+cursor, nil)
		req.Header.Set("Authorization", "Bearer "+cloudAPIToken)
		resp, err := c.hc.Do(req)
		if err != nil {
			c.t.Fatalf("export: %v", err)
		}
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			c.t.Fatalf("export: %d %s", resp.StatusCode, raw)
		}
		lines := bytes.Split(bytes.TrimSpace(raw), []byte("\n"))
		if len(raw) == 0 {
			return out
		}
		for _, l := range lines {
			var r struct {
				Cursor string `json:"cursor"`
				Device string `json:"device"`
			}
			if err := json.Unmarshal(l, &r); err != nil {
				c.t.Fatalf("export line %q: %v", l, err)
			}
			out = append(out, exportLine{Cursor: r.Cursor, Line: l, Device: r.Device})
		}
		next := resp.Header.Get("X-Outpost-Next-Cursor")
		if next == cursor {
			return out
		}
		cursor = next
	}
}

// sinkMsg is one message a sink holds.
type sinkMsg struct {
	key, device string
	value       []byte
	partition   int32
}

// checkSinkDelivery asserts that got (in the sink's order) holds every
// export record once in effect: each key's value is exactly its export
// line, a key repeats only with the same value, nothing else is there, and
// per partition each device's records first arrive in export order.
func checkSinkDelivery(t *testing.T, sink string, want []exportLine, got []sinkMsg) {
	t.Helper()
	pos := map[string]int{}
	for i, w := range want {
		pos[w.Cursor] = i
	}
	seen := map[string]bool{}
	last := map[string]int{} // partition/device → last export position
	dups := 0
	for _, m := range got {
		i, ok := pos[m.key]
		if !ok {
			t.Fatalf("%s: message %s is not an export record", sink, m.key)
		}
		if !bytes.Equal(m.value, want[i].Line) {
			t.Fatalf("%s: message %s is\n%s\nnot its export line\n%s", sink, m.key, m.value, want[i].Line)
		}
		if seen[m.key] {
			dups++
			continue
		}
		seen[m.key] = true
		k := fmt.Sprintf("%d/%s", m.partition, want[i].Device)
		if p, ok := last[k]; ok && p > i {
			t.Fatalf("%s: device %s's %s arrived after a later record", sink, want[i].Device, m.key)
		}
		last[k] = i
	}
	missing := 0
	for _, w := range want {
		if !seen[w.Cursor] {
			missing++
			if missing < 5 {
				t.Errorf("%s: export record %s never arrived", sink, w.Cursor)
			}
		}
	}
	if missing > 0 {
		t.Fatalf("%s: %d of %d export records missing (a gap)", sink, missing, len(want))
	}
	t.Logf("%s: %d records, all present; %d re-sent duplicates with the same key", sink, len(want), dups)
}

// TestSinksLeaderKillNoGap: a 3-node cluster exports to a real JetStream
// server and to Kafka (kfake) while edges push; the leader is killed
// mid-stream. The new leader resumes each sink from its replicated cursor:
// every committed record arrives, exactly as its export line, keyed by its
// cursor, duplicates only with the same key, each device in order. GET
// /api/v1/sinks answers through a follower with the leader's view.
func TestSinksLeaderKillNoGap(t *testing.T) {
	ns := natstest.Start(t)
	kc, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(3, "outpost-export"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(kc.Close)
	cfg := fmt.Sprintf(`export:
  cursor_interval: 200ms
  retry_max: 500ms
  batch: 64
  sinks:
    - name: js
      type: nats
      url: %s
      subject: outpost.export
      stream: OUTPOST
    - name: kafka
      type: kafka
      brokers: [%s]
      topic: outpost-export
`, ns.URL(), strings.Join(kc.ListenAddrs(), ", "))
	file := filepath.Join(t.TempDir(), "cloud-sync.yaml")
	if err := os.WriteFile(file, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	c := startCloudCluster(t, 3, cloudWithArgs("-config", file))
	lead := c.mustLeader(10 * time.Second)
	ctx := cloudCtx(t, 90*time.Second)

	stop := make(chan struct{})
	var (
		wg    sync.WaitGroup
		count atomic.Int64
		fail  atomic.Value
	)
	for e := 0; e < 2; e++ {
		edge := fmt.Sprintf("e%d", e)
		cl := c.edgeClient(edge)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for seq := uint64(1); ; seq += 2 {
				select {
				case <-stop:
					return
				default:
				}
				pctx, cancel := context.WithTimeout(ctx, 20*time.Second)
				_, err := cloudPushUntilAcked(pctx, cl, cloudReadingsBatch(edge, seq, 3, 2))
				cancel()
				if err != nil {
					fail.Store(fmt.Errorf("%s seq %d: %w", edge, seq, err))
					return
				}
				count.Add(1)
			}
		}()
	}
	t.Cleanup(func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
	})
	// Mid-stream: both sinks have taken records and replicated a cursor.
	cloudWaitFor(t, 30*time.Second, "both sinks publishing with a replicated cursor", func() bool {
		_, items, err := c.sinks(c.Nodes[lead], "")
		return err == nil && count.Load() > 40 && items["js"].Cursor > 0 && items["kafka"].Cursor > 0 &&
			items["js"].Published > 0 && items["kafka"].Published > 0
	})
	c.kill(lead)
	before := count.Load()
	cloudWaitFor(t, 30*time.Second, "writes acknowledged after the leader died", func() bool { return count.Load() > before+40 })
	close(stop)
	wg.Wait()
	if err, _ := fail.Load().(error); err != nil {
		t.Fatal(err)
	}
	newLead := c.mustLeader(10 * time.Second)
	if newLead == lead {
		t.Fatal("killed node still reported as leader")
	}
	follower := -1
	for i, n := range c.Nodes {
		if i != newLead && n.running {
			follower = i
		}
	}
	cloudWaitFor(t, 30*time.Second, "both sinks caught up on the new leader", func() bool {
		node, items, err := c.sinks(c.Nodes[follower], "")
		if err != nil || node != c.Nodes[newLead].ID {
			return false
		}
		for _, name := range []string{"js", "kafka"} {
			if s := items[name]; !s.Active || s.LagRecords != 0 || s.LagEntries != 0 || s.Published == 0 {
				return false
			}
		}
		return true
	})
	checkMetrics(t, "cloud-sync", scrape(t, c.Nodes[newLead].URL()+"/metrics", cloudAPIToken), []string{
		`outpost_cloud_sink_active\{sink="js"\} 1`,
		`outpost_cloud_sink_lag_records\{sink="kafka"\} 0`,
		`outpost_cloud_sink_published_total\{sink="js"\} [1-9]`,
		`outpost_cloud_sink_cursor\{sink="kafka"\} [1-9]`,
	})
	if node, items, err := c.sinks(c.Nodes[follower], "?consistency=local"); err != nil || node != c.Nodes[follower].ID || items["js"].Active {
		t.Fatalf("local sinks view on the follower: node %s %+v %v", node, items, err)
	}

	want := c.exportLines(c.Nodes[newLead])
	var js []sinkMsg
	for _, m := range ns.Stream("OUTPOST") {
		js = append(js, sinkMsg{key: m.ID, value: m.Data})
	}
	checkSinkDelivery(t, "jetstream", want, js)
	checkSinkDelivery(t, "kafka", want, consumeTopic(t, kc.ListenAddrs(), "outpost-export", len(want)))
}

// consumeTopic reads topic from the start until it has at least n records
// and then until the topic is drained.
func consumeTopic(t *testing.T, brokers []string, topic string, n int) []sinkMsg {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var out []sinkMsg
	deadline := time.Now().Add(30 * time.Second)
	for {
		wait := 20 * time.Second
		if len(out) >= n {
			wait = 500 * time.Millisecond // the rest: re-sent duplicates already produced
		}
		ctx, cancel := context.WithTimeout(context.Background(), wait)
		fs := cl.PollFetches(ctx)
		cancel()
		got := 0
		fs.EachRecord(func(r *kgo.Record) {
			got++
			m := sinkMsg{key: string(r.Key), value: r.Value, partition: r.Partition}
			for _, h := range r.Headers {
				if h.Key == "device" {
					m.device = string(h.Value)
				}
			}
			out = append(out, m)
		})
		if got == 0 && len(out) >= n {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("consumed %d records of %s, want at least %d", len(out), topic, n)
		}
	}
}

// TestSinksStopWhenLeadershipIsLost: a leader cut off from its peers stops
// its publishers (its local view says inactive) while the majority's new
// leader takes the sink over; healed, every record is in the stream.
func TestSinksStopWhenLeadershipIsLost(t *testing.T) {
	ns := natstest.Start(t)
	file := filepath.Join(t.TempDir(), "cloud-sync.yaml")
	cfg := fmt.Sprintf("export:\n  cursor_interval: 100ms\n  retry_max: 300ms\n  sinks:\n"+
		"    - {name: js, type: nats, url: %q, subject: outpost.export}\n", ns.URL())
	if err := os.WriteFile(file, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	c := startCloudCluster(t, 3, cloudWithProxies(), cloudWithArgs("-config", file))
	lead := c.mustLeader(10 * time.Second)
	ctx := cloudCtx(t, 60*time.Second)
	if _, err := cloudPushUntilAcked(ctx, c.edgeClient("e1"), cloudReadingsBatch("e1", 1, 2, 2)); err != nil {
		t.Fatal(err)
	}
	active := func(i int) bool {
		_, items, err := c.sinks(c.Nodes[i], "?consistency=local")
		return err == nil && items["js"].Active
	}
	cloudWaitFor(t, 20*time.Second, "the leader publishing", func() bool { return active(lead) })
	c.isolate(lead, true)
	cloudWaitFor(t, 20*time.Second, "the cut-off leader's publisher to stop", func() bool { return !active(lead) })
	var others []*cloudNode
	for i, n := range c.Nodes {
		if i != lead {
			others = append(others, n)
		}
	}
	if _, err := cloudPushUntilAcked(ctx, c.edgeClient("e1", others...), cloudReadingsBatch("e1", 3, 2, 2)); err != nil {
		t.Fatalf("majority side: %v", err)
	}
	cloudWaitFor(t, 20*time.Second, "the new leader publishing, caught up", func() bool {
		for i := range c.Nodes {
			if i == lead {
				continue
			}
			if _, items, err := c.sinks(c.Nodes[i], "?consistency=local"); err == nil && items["js"].Active && items["js"].LagRecords == 0 {
				return true
			}
		}
		return false
	})
	c.isolate(lead, false)
	want := c.exportLines(others[0])
	var got []sinkMsg
	for _, m := range ns.Stream("js") {
		got = append(got, sinkMsg{key: m.ID, value: m.Data})
	}
	checkSinkDelivery(t, "jetstream", want, got)
	if len(want) != 4 {
		t.Fatalf("%d export records, want 4", len(want))
	}
}
