package sinks

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// natsPublisher publishes to a JetStream stream. The connection does not
// reconnect by itself: a broken one fails the batch, and the manager dials
// again after its backoff, so there is one retry policy.
type natsPublisher struct {
	nc      *nats.Conn
	js      jetstream.JetStream
	subject string
	stream  string
}

// natsAckTimeout bounds the wait for one message's acknowledgement.
const natsAckTimeout = 10 * time.Second

func dialNATS(ctx context.Context, c Config, log *slog.Logger) (Publisher, error) {
	nc, err := nats.Connect(c.URL, nats.Name("outpost-cloud-sync/"+c.Name), nats.NoReconnect(),
		nats.Timeout(5*time.Second))
	if err != nil {
		return nil, fmt.Errorf("nats sink %s: connect: %w", c.Name, err)
	}
	// A whole batch is in flight at once: let it (the default cap is 4000).
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncTimeout(natsAckTimeout),
		jetstream.WithPublishAsyncMaxPending(maxBatch))
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("nats sink %s: %w", c.Name, err)
	}
	name := c.StreamName()
	if _, err := js.Stream(ctx, name); errors.Is(err, jetstream.ErrStreamNotFound) {
		_, err = js.CreateStream(ctx, jetstream.StreamConfig{Name: name, Subjects: []string{c.Subject},
			Storage: jetstream.FileStorage, Duplicates: 2 * time.Minute})
		if err != nil && !errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			nc.Close()
			return nil, fmt.Errorf("nats sink %s: create stream %s: %w", c.Name, name, err)
		}
		if err == nil {
			log.Info("export sink: created JetStream stream", "stream", name, "subject", c.Subject)
		}
	} else if err != nil {
		nc.Close()
		return nil, fmt.Errorf("nats sink %s: stream %s: %w", c.Name, name, err)
	}
	return &natsPublisher{nc: nc, js: js, subject: c.Subject, stream: name}, nil
}

// Publish sends every message before waiting for any acknowledgement
// (pipelined, in order on one connection), then waits for all of them.
func (p *natsPublisher) Publish(ctx context.Context, msgs []Message) error {
	futs := make([]jetstream.PubAckFuture, 0, len(msgs))
	for _, m := range msgs {
		msg := nats.NewMsg(p.subject)
		msg.Data = m.Value
		// Expecting the stream refuses a subject another stream captures.
		f, err := p.js.PublishMsgAsync(msg, jetstream.WithMsgID(m.Key), jetstream.WithExpectStream(p.stream))
		if err != nil {
			return fmt.Errorf("publish %s: %w", m.Key, err)
		}
		futs = append(futs, f)
	}
	for i, f := range futs {
		select {
		case <-f.Ok():
		case err := <-f.Err():
			return fmt.Errorf("publish %s: %w", msgs[i].Key, err)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

func (p *natsPublisher) Close() { p.nc.Close() }
