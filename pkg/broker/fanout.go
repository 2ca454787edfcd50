package broker

import (
	"context"
	"log/slog"

	mqtt "github.com/mochi-mqtt/server/v2"
)

// fanout routes stored messages to the broker's subscribers (dashboards on
// sensors/#, bridges, phones) off the ingest writer's goroutine: forward is
// called from a commit's completion, right after the acknowledgement is
// queued, and only enqueues, so routing never delays an acknowledgement or
// a commit. A full queue drops the message for subscribers (counted in
// outpost_mqtt_fanout_dropped_total); the store has it.
//
// Semantics (README "MQTT contract"): a message is routed at the QoS it was
// published with, each subscriber receiving it at the lesser of that and
// its subscription's QoS, and with its retain flag: a retained message
// replaces the topic's retained message (an empty one clears it), as MQTT
// says. It is routed once it is durable, so a subscriber never sees a
// message the edge could lose; every message the writer finished with
// nil (stored, a duplicate of a stored one, or dead-lettered) is routed,
// unless routing falls behind: then only each topic's latest messages are
// (see run), and the store has every one.
type fanout struct {
	srv *mqtt.Server
	q   chan fanMsg
	met *metrics
	log *slog.Logger
}

type fanMsg struct {
	topic   string
	payload []byte
	qos     byte
	retain  bool
}

func newFanout(srv *mqtt.Server, size int, met *metrics, log *slog.Logger) *fanout {
	return &fanout{srv: srv, q: make(chan fanMsg, size), met: met, log: log}
}

// forward queues a stored message for routing; it never blocks.
func (f *fanout) forward(topic string, payload []byte, qos byte, retain bool) {
	select {
	case f.q <- fanMsg{topic, payload, qos, retain}:
	default:
		f.met.fanDropped.Inc()
	}
}

// run routes queued messages until ctx ends. It takes everything queued
// at once; when that is more than one message (routing is behind), only
// each topic's last retained and last non-retained message are routed:
// subscribers get the latest reading instead of a growing backlog, the
// topic's retained message ends as it would have, and routing (with the
// state file's write of each retained message) costs at most two passes
// per topic per round however fast devices publish.
func (f *fanout) run(ctx context.Context) {
	batch := make([]fanMsg, 0, 256)
	last := map[fanKey]int{}
	for {
		select {
		case <-ctx.Done():
			return
		case m := <-f.q:
			batch = append(batch[:0], m)
		}
	drain:
		for len(batch) < cap(f.q) {
			select {
			case m := <-f.q:
				batch = append(batch, m)
			default:
				break drain
			}
		}
		n := len(batch)
		kept := conflate(batch, last)
		f.met.fanConflated.Add(float64(n - len(kept)))
		for _, m := range kept {
			if err := f.srv.Publish(m.topic, m.payload, m.retain, m.qos); err != nil {
				f.log.Debug("fan-out publish failed", "topic", m.topic, "err", err)
			}
		}
		clear(batch[:n]) // drop payload references
	}
}

// conflate keeps, in order, each topic's last retained and last
// non-retained message, in place (the retained message a topic ends with
// is the one it would have ended with); last is scratch space.
func conflate(batch []fanMsg, last map[fanKey]int) []fanMsg {
	if len(batch) < 2 {
		return batch
	}
	clear(last)
	for i, m := range batch {
		last[fanKey{m.topic, m.retain}] = i
	}
	kept := batch[:0]
	for i, m := range batch {
		if last[fanKey{m.topic, m.retain}] == i {
			kept = append(kept, m)
		}
	}
	return kept
}

type fanKey struct {
	topic  string
	retain bool
}

// Forward routes a message the edge stored to the broker's subscribers, at
// qos with retain, without blocking (see fanout). In external-broker mode
// the edge feeds its phone-only broker through it after each commit.
func (b *Broker) Forward(topic string, payload []byte, qos byte, retain bool) {
	b.fan.forward(topic, payload, qos, retain)
}
