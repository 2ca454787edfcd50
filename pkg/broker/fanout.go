package broker

import (
	"context"
	"log/slog"
	"time"
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
// (see run), at most once per interval, and the store has every one.
type fanout struct {
	srv   publisher
	q     chan fanMsg
	every time.Duration // the least time from one round behind to the next
	met   *metrics
	log   *slog.Logger
	// pause waits d or until ctx ends, reporting whether d passed; tests
	// replace it to hold the fan-out between rounds.
	pause func(ctx context.Context, d time.Duration) bool
}

// publisher routes one message to the broker's subscribers (mochi's
// Server.Publish).
type publisher interface {
	Publish(topic string, payload []byte, retain bool, qos byte) error
}

type fanMsg struct {
	topic   string
	payload []byte
	qos     byte
	retain  bool
}

func newFanout(srv publisher, size int, every time.Duration, met *metrics, log *slog.Logger) *fanout {
	return &fanout{srv: srv, q: make(chan fanMsg, size), every: every, met: met, log: log, pause: pause}
}

func pause(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
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
//
// A round that had to skip messages begins the next no sooner than every
// after it began. Without that pause the fan-out would take whatever CPU
// ingest leaves: the faster it routes, the more rounds it makes, each
// costing a delivery per topic and subscriber (with 1,000 phones on 100
// devices publishing at full rate it took half of a 2-core edge and
// halved ingest). Paced, its cost is bounded by topics × subscribers per
// interval, whatever the publish rate; a subscriber still gets each
// topic's latest message, now at most once per interval while routing
// is behind. Routing that keeps up (no topic with two messages queued) is
// never paused.
func (f *fanout) run(ctx context.Context) {
	batch := make([]fanMsg, 0, 256)
	last := map[fanKey]int{}
	var began time.Time
	behind := false
	for {
		select {
		case <-ctx.Done():
			return
		case m := <-f.q:
			batch = append(batch[:0], m)
		}
		if behind {
			if d := f.every - time.Since(began); d > 0 && !f.pause(ctx, d) {
				return
			}
		}
		began = time.Now()
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
		behind = len(kept) < n
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
