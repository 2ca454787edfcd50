package sinks

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outpost-edge/outpost/internal/natstest"
)

// TestJetStreamSink: against a real nats-server the sink creates its
// stream, delivers every record in order keyed by Nats-Msg-Id, keeps
// retrying while the server is down (the error and lag show), and catches
// up after it returns, without a gap.
func TestJetStreamSink(t *testing.T) {
	srv := natstest.Start(t)
	c := startCluster(t)
	cfg := Config{Name: "js", Type: TypeNATS, URL: srv.URL(), Subject: "outpost.export", Stream: "OUTPOST"}
	m := runManager(t, c, Options{Sinks: []Config{cfg}, CursorInterval: 20 * time.Millisecond, RetryMax: 100 * time.Millisecond, Batch: 16}, nil, nil)
	for i := range 40 {
		c.push(t, fmt.Sprintf("d%d", i%4))
	}
	waitFor(t, "40 records in the stream", func() bool {
		sts, _ := m.Status()
		return sts[0].Published >= 40 && sts[0].LagRecords == 0
	})
	checkDelivery(t, c.state, streamMessages(srv, "OUTPOST"))

	srv.Stop()
	for i := range 20 {
		c.push(t, fmt.Sprintf("d%d", i%4))
	}
	waitFor(t, "the outage reported", func() bool {
		sts, _ := m.Status()
		return sts[0].Failures >= 2 && sts[0].LastError != "" && sts[0].LagRecords > 0
	})
	srv.Start()
	waitFor(t, "catch-up after the server returned", func() bool {
		sts, _ := m.Status()
		return sts[0].LagRecords == 0 && sts[0].Published >= 60
	})
	got := streamMessages(srv, "OUTPOST")
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

// streamMessages reads a stream as Messages keyed by their Nats-Msg-Id.
func streamMessages(srv *natstest.Server, stream string) []Message {
	var out []Message
	for _, m := range srv.Stream(stream) {
		out = append(out, Message{Key: m.ID, Value: m.Data})
	}
	return out
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
