package sinks

import (
	"context"
	"fmt"
	"hash/fnv"
	"log/slog"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

// kafkaPublisher produces to one topic with franz-go's idempotent producer
// (acks from all in-sync replicas; retries keep a partition's order). The
// key is the export cursor; the partition is chosen by the record's device,
// so a device's records stay in one partition, in order.
type kafkaPublisher struct {
	cl *kgo.Client
}

// kafkaDeliveryTimeout bounds how long franz-go retries one record before
// the batch fails and the manager's backoff takes over.
const kafkaDeliveryTimeout = 15 * time.Second

// headerDevice carries a record's device (partitioning, and consumers that
// filter without decoding).
const headerDevice = "device"

func dialKafka(_ context.Context, c Config, _ *slog.Logger) (Publisher, error) {
	cl, err := kgo.NewClient(
		kgo.SeedBrokers(c.Brokers...),
		kgo.DefaultProduceTopic(c.Topic),
		kgo.ClientID("outpost-cloud-sync"),
		kgo.RecordPartitioner(kgo.BasicConsistentPartitioner(func(string) func(*kgo.Record, int) int {
			return func(r *kgo.Record, n int) int {
				h := fnv.New32a()
				for _, hd := range r.Headers {
					if hd.Key == headerDevice {
						h.Write(hd.Value)
					}
				}
				return int(h.Sum32() % uint32(n))
			}
		})),
		kgo.RecordDeliveryTimeout(kafkaDeliveryTimeout),
		kgo.ProducerLinger(0),
	)
	if err != nil {
		return nil, fmt.Errorf("kafka sink %s: %w", c.Name, err)
	}
	return &kafkaPublisher{cl: cl}, nil
}

// Publish produces the batch and waits until every record is acknowledged.
func (p *kafkaPublisher) Publish(ctx context.Context, msgs []Message) error {
	rs := make([]*kgo.Record, len(msgs))
	for i, m := range msgs {
		rs[i] = &kgo.Record{Key: []byte(m.Key), Value: m.Value,
			Headers: []kgo.RecordHeader{{Key: headerDevice, Value: []byte(m.Device)}}}
	}
	return p.cl.ProduceSync(ctx, rs...).FirstErr()
}

func (p *kafkaPublisher) Close() { p.cl.Close() }
