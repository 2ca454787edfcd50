package sinks

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
)

// findNATSServer returns the nats-server binary, skipping the test when it
// is missing, or failing it in CI (CI=true), where .ci/run installs it.
func findNATSServer(t testing.TB) string {
	t.Helper()
	for _, p := range []string{os.Getenv("NATS_SERVER"), "/usr/sbin/nats-server", "/usr/bin/nats-server"} {
		if p != "" {
			if _, err := os.Stat(p); err == nil {
				return p
			}
		}
	}
	if p, err := exec.LookPath("nats-server"); err == nil {
		return p
	}
	const msg = "nats-server not found (looked at $NATS_SERVER, /usr/sbin/nats-server and $PATH): " +
		"the JetStream sink test did NOT run; install it with `apt-get install nats-server`"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip("SKIPPED: " + msg)
	return ""
}

func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// natsServer is a real `nats-server -js` on a loopback port with its store
// in a temp dir; Stop and Start keep both, as a restarted server would.
type natsServer struct {
	t    testing.TB
	bin  string
	port int
	dir  string
	cmd  *exec.Cmd
	out  *syncBuffer
}

// startNATS starts a JetStream server for the test; it is stopped at
// cleanup.
func startNATS(t testing.TB) *natsServer {
	t.Helper()
	s := &natsServer{t: t, bin: findNATSServer(t), port: freePort(t), dir: t.TempDir()}
	s.start()
	t.Cleanup(s.stop)
	return s
}

func (s *natsServer) url() string { return "nats://127.0.0.1:" + strconv.Itoa(s.port) }

func (s *natsServer) start() {
	s.t.Helper()
	s.out = &syncBuffer{}
	s.cmd = exec.Command(s.bin, "-js", "-a", "127.0.0.1", "-p", strconv.Itoa(s.port), "-sd", s.dir)
	s.cmd.Stdout, s.cmd.Stderr = s.out, s.out
	if err := s.cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		nc, err := nats.Connect(s.url(), nats.NoReconnect())
		if err == nil {
			js, _ := jetstream.New(nc)
			_, err = js.AccountInfo(context.Background())
			nc.Close()
			if err == nil {
				return
			}
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("nats-server not ready within 20s: %v\n%s", err, s.out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (s *natsServer) stop() {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Kill()
	_ = s.cmd.Wait()
	s.cmd = nil
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// streamMessages reads every message of a stream, in stream order, as
// Messages keyed by their Nats-Msg-Id.
func streamMessages(t testing.TB, url, stream string) []Message {
	t.Helper()
	nc, err := nats.Connect(url, nats.NoReconnect())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	st, err := js.Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []Message
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		m, err := st.GetMsg(ctx, seq)
		if err != nil {
			t.Fatalf("get %d: %v", seq, err)
		}
		out = append(out, Message{Key: m.Header.Get(jetstream.MsgIDHeader), Value: m.Data})
	}
	return out
}

// TestJetStreamSink: against a real nats-server the sink creates its
// stream, delivers every record in order keyed by Nats-Msg-Id, keeps
// retrying while the server is down (the error and lag show), and catches
// up after it returns, without a gap.
func TestJetStreamSink(t *testing.T) {
	srv := startNATS(t)
	c := startCluster(t)
	cfg := Config{Name: "js", Type: TypeNATS, URL: srv.url(), Subject: "outpost.export", Stream: "OUTPOST"}
	m := runManager(t, c, Options{Sinks: []Config{cfg}, CursorInterval: 20 * time.Millisecond, RetryMax: 100 * time.Millisecond, Batch: 16}, nil, nil)
	for i := range 40 {
		c.push(t, fmt.Sprintf("d%d", i%4))
	}
	waitFor(t, "40 records in the stream", func() bool {
		sts, _ := m.Status()
		return sts[0].Published >= 40 && sts[0].LagRecords == 0
	})
	checkDelivery(t, c.state, streamMessages(t, srv.url(), "OUTPOST"))

	srv.stop()
	for i := range 20 {
		c.push(t, fmt.Sprintf("d%d", i%4))
	}
	waitFor(t, "the outage reported", func() bool {
		sts, _ := m.Status()
		return sts[0].Failures >= 2 && sts[0].LastError != "" && sts[0].LagRecords > 0
	})
	srv.start()
	waitFor(t, "catch-up after the server returned", func() bool {
		sts, _ := m.Status()
		return sts[0].LagRecords == 0 && sts[0].Published >= 60
	})
	got := streamMessages(t, srv.url(), "OUTPOST")
	if len(got) != 60 {
		t.Fatalf("stream holds %d messages, want 60 (JetStream drops re-sent ids)", len(got))
	}
	checkDelivery(t, c.state, got)
}

// TestKafkaSink: against franz-go's kfake the sink delivers every record,
// keyed by its export cursor, each device's records in one partition and in
// order.
func TestKafkaSink(t *testing.T) {
	kc, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(3, "outpost-export"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(kc.Close)
	c := startCluster(t)
	cfg := Config{Name: "kafka", Type: TypeKafka, Brokers: kc.ListenAddrs(), Topic: "outpost-export"}
	m := runManager(t, c, Options{Sinks: []Config{cfg}, CursorInterval: 20 * time.Millisecond, Batch: 16}, nil, nil)
	for i := range 60 {
		c.push(t, fmt.Sprintf("d%d", i%5))
	}
	waitFor(t, "60 records produced", func() bool {
		sts, _ := m.Status()
		return sts[0].Published >= 60 && sts[0].LagRecords == 0
	})
	got := consumeKafka(t, kc.ListenAddrs(), "outpost-export", 60)
	checkKafka(t, c, got)
}

type kafkaMsg struct {
	Message
	partition int32
}

// consumeKafka reads n records of topic from the start.
func consumeKafka(t testing.TB, brokers []string, topic string, n int) []kafkaMsg {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumeTopics(topic), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var out []kafkaMsg
	for len(out) < n {
		fs := cl.PollFetches(ctx)
		if err := ctx.Err(); err != nil {
			t.Fatalf("consumed %d of %d records: %v", len(out), n, err)
		}
		fs.EachRecord(func(r *kgo.Record) {
			var dev string
			for _, h := range r.Headers {
				if h.Key == headerDevice {
					dev = string(h.Value)
				}
			}
			out = append(out, kafkaMsg{Message{Key: string(r.Key), Device: dev, Value: r.Value}, r.Partition})
		})
	}
	return out
}

// checkKafka asserts got holds every record of the log (duplicates only
// with the same key), each device in one partition, in log order there.
func checkKafka(t *testing.T, c *cluster, got []kafkaMsg) {
	t.Helper()
	part := map[string]int32{}
	byDev := map[string][]Message{}
	seen := map[string]bool{}
	for _, m := range got {
		if p, ok := part[m.Device]; ok && p != m.partition {
			t.Fatalf("device %s in partitions %d and %d", m.Device, p, m.partition)
		}
		part[m.Device] = m.partition
		if !seen[m.Key] {
			seen[m.Key] = true
			byDev[m.Device] = append(byDev[m.Device], m.Message)
		}
	}
	var all []Message
	for _, ms := range byDev {
		for i := 1; i < len(ms); i++ {
			if !cursorLess(ms[i-1].Key, ms[i].Key) {
				t.Fatalf("device %s out of order: %s before %s", ms[0].Device, ms[i-1].Key, ms[i].Key)
			}
		}
		all = append(all, ms...)
	}
	sortByCursor(all)
	checkDelivery(t, c.state, all)
}

func cursorLess(a, b string) bool {
	var ai, an, bi, bn uint64
	fmt.Sscanf(a, "%d.%d", &ai, &an)
	fmt.Sscanf(b, "%d.%d", &bi, &bn)
	return ai < bi || ai == bi && an < bn
}

func sortByCursor(ms []Message) {
	slices.SortFunc(ms, func(a, b Message) int {
		switch {
		case cursorLess(a.Key, b.Key):
			return -1
		case cursorLess(b.Key, a.Key):
			return 1
		}
		return 0
	})
}
