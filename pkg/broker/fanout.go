package broker

import (
	"context"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
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
// (see run), and the store has every one.
//
// Phones (README "Live feed") get the same messages through the live
// mirror, at most one per topic per interval (liveFeed).
type fanout struct {
	srv publisher
	q   chan fanMsg
	// live is the phones' feed; nil when the broker has no phones.
	live *liveFeed
	// phonesOn reports whether any phone is connected: without one, only
	// retained messages are mirrored (for phones that subscribe later).
	phonesOn func() bool
	// direct, if set, writes a live message to its phones itself
	// (phoneHook.writeLive) and reports whether it did.
	direct func(topic string, payload []byte, qos byte, at int64) bool
	met    *metrics
	log    *slog.Logger
	now    func() time.Time
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
	// liveOnly: mochi routed it to TCP subscribers itself (QoS 2); only
	// the live mirror is fed.
	liveOnly bool
	// at is when the writer finished with it (Unix ns): the start of its
	// live delivery's latency.
	at int64
}

// newFanout: a non-nil phonesOn enables the live mirror, at one message
// per topic per every.
func newFanout(srv publisher, size int, every time.Duration, phonesOn func() bool, met *metrics, log *slog.Logger) *fanout {
	f := &fanout{srv: srv, q: make(chan fanMsg, size), met: met, log: log, now: time.Now}
	if phonesOn != nil {
		f.live, f.phonesOn = newLiveFeed(every), phonesOn
		f.live.stamps = &liveStamps{}
	}
	return f
}

// forward queues a stored message for routing; it never blocks.
func (f *fanout) forward(topic string, payload []byte, qos byte, retain bool) {
	f.enqueue(fanMsg{topic: topic, payload: payload, qos: qos, retain: retain, at: f.now().UnixNano()})
}

// forwardLive queues a stored message mochi has routed itself for the
// phones' live mirror only; it never blocks.
func (f *fanout) forwardLive(topic string, payload []byte, qos byte, retain bool) {
	if f.live != nil {
		f.enqueue(fanMsg{topic: topic, payload: payload, qos: qos, retain: retain, liveOnly: true, at: f.now().UnixNano()})
	}
}

func (f *fanout) enqueue(m fanMsg) {
	select {
	case f.q <- m:
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
// Each routed message is offered to the live mirror too, which sends it
// to phones at once or holds it until its topic's interval has passed; a
// timer sends what is held, with the next batch if one comes within a
// livePasses-th of the interval (its messages are fresher).
func (f *fanout) run(ctx context.Context) {
	batch := make([]fanMsg, 0, 256)
	last := map[fanKey]int{}
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	var wake <-chan time.Time // timer.C while the live feed remembers a topic
	var wakeAt time.Time      // when timer fires
	// arm makes the timer fire by at (not sooner than liveFeed.wait
	// allows). It only ever brings the timer forward: moving it back
	// (wait's floor puts a due time just ahead a little later) would let
	// a steady stream of batches postpone it for ever, and phones would
	// get nothing but each topic's first message.
	arm := func(at, now time.Time) {
		d := f.live.wait(at, now)
		if when := now.Add(d); wake == nil || when.Before(wakeAt) {
			timer.Reset(d) // Go ≥ 1.23: no stale tick after Reset
			wake, wakeAt = timer.C, when
		}
	}
	var due []fanMsg
	// ripe: the timer found held messages due; they go with the next
	// batch, whose messages are the freshest there will be (a pass at the
	// timer sends what came with the last commit, up to a commit's time
	// old), or when the timer fires again if no batch comes first.
	ripe := false
	pass := func() {
		var next time.Time
		at := f.now()
		due, next = f.live.due(at, due[:0])
		for _, m := range due {
			f.mirror(m)
		}
		clear(due)
		wake = nil
		switch now := f.now(); {
		case !next.IsZero():
			arm(next, now)
		case len(f.live.topics) > 0: // to forget them once idle
			arm(now.Add(f.live.every), now)
		default:
			timer.Stop()
		}
		// Topics the pass put off (due says they are due at once) are
		// ripe already: the next pass need not wait for the timer twice.
		ripe = next.Equal(at)
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-wake:
			if ripe {
				pass()
				continue
			}
			// wait's floor: a batch's arm cannot bring it forward.
			d := f.live.every / livePasses
			timer.Reset(d)
			ripe, wakeAt = true, f.now().Add(d)
			continue
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
		now := f.now()
		mirrorLive := f.live != nil && f.phonesOn() // without a phone, only retained messages (for later ones)
		for _, m := range kept {
			if !m.liveOnly {
				if err := f.srv.Publish(m.topic, m.payload, m.retain, m.qos); err != nil {
					f.log.Debug("fan-out publish failed", "topic", m.topic, "err", err)
				}
			}
			if f.live == nil || !m.retain && !mirrorLive {
				continue
			}
			if at, held := f.live.offer(m, now); held {
				arm(at, now)
			} else {
				f.mirror(m)
				// Not held, but remembered: a pass forgets it once idle,
				// so that topics seen once do not pile up.
				if wake == nil {
					arm(now.Add(f.live.every), now)
				}
			}
		}
		if f.live != nil && f.live.skipped > 0 {
			f.met.liveSkipped.Add(float64(f.live.skipped))
			f.live.skipped = 0
		}
		if ripe {
			pass()
		}
		clear(batch[:n]) // drop payload references
	}
}

// mirror publishes m on the live mirror of its topic, to phones.
func (f *fanout) mirror(m fanMsg) {
	if m.at != 0 {
		f.met.liveHold.Observe(time.Duration(f.now().UnixNano() - m.at).Seconds())
	}
	f.live.stamps.note(m.topic, m.at)
	if !m.retain && f.direct != nil && f.direct(m.topic, m.payload, m.qos, m.at) {
		return
	}
	if err := f.srv.Publish(livePrefix+m.topic, m.payload, m.retain, m.qos); err != nil {
		f.log.Debug("live feed publish failed", "topic", m.topic, "err", err)
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
		last[fanKey{m.topic, m.retain, m.liveOnly}] = i
	}
	kept := batch[:0]
	for i, m := range batch {
		if last[fanKey{m.topic, m.retain, m.liveOnly}] == i {
			kept = append(kept, m)
		}
	}
	return kept
}

type fanKey struct {
	topic    string
	retain   bool
	liveOnly bool
}

// livePrefix holds the live mirror: phones' subscriptions to sensors/
// topics are kept under livePrefix+filter (phone.go rewrites them, and
// their deliveries back), and only the fan-out publishes there (no client
// may, nor read it: auth.go). A topic starting with '$' matches no
// wildcard subscription from its first level on.
//
// Why a mirror: routing to a subscriber costs a delivery (mochi's copy,
// queue, write goroutine, encoding, one WebSocket message and syscall,
// and the phone's read), and the fan-out takes whatever CPU ingest
// leaves: the faster it routes, the more rounds it makes. With 1,000
// phones on 100 devices publishing at full rate it took half of a 2-core
// edge and halved ingest. mochi routes a message to every subscriber of
// its topic; the mirror lets phones have a rate of their own while TCP
// subscribers keep theirs.
const livePrefix = "$live/"

// liveFeed is the phones' rate: each topic's messages (retained and not
// retained apart) are sent at most once per interval, the first at once
// and the latest of those that came meanwhile when the interval has
// passed, so a phone's view lags a topic by about one interval at most
// (a little more when many topics fall due together: see due), costs at
// most one delivery per topic and phone per interval however fast devices
// publish, and ends on the topic's last message. It is the fan-out
// goroutine's.
type liveFeed struct {
	every   time.Duration
	topics  map[fanKey]*liveTopic
	skipped int // held messages replaced by a newer one, since the caller last took the count
	// stamps: when each topic's message last mirrored was committed, for
	// outpost_mqtt_live_delivery_duration_seconds (phone.go); forgotten
	// with the topic. nil in tests.
	stamps *liveStamps
	ready  []readyTopic // due's scratch space
}

type liveTopic struct {
	sent    time.Time // last sent to phones
	held    fanMsg    // the latest message since, when holding
	holding bool
}

type readyTopic struct {
	at time.Time
	t  *liveTopic
}

// livePasses is how many passes of due an interval holds at most
// (wait's floor), and each pass sends at most 2/livePasses of the topics:
// topics that fall due together are spread over the interval instead of
// going out at once, every interval after (see due).
const livePasses = 20

func newLiveFeed(every time.Duration) *liveFeed {
	return &liveFeed{every: every, topics: map[fanKey]*liveTopic{}}
}

// offer reports whether m is held, in place of any older message of its
// topic, and until when; if not, it is to be sent now.
func (l *liveFeed) offer(m fanMsg, now time.Time) (time.Time, bool) {
	k := fanKey{topic: m.topic, retain: m.retain}
	t := l.topics[k]
	if t == nil {
		t = &liveTopic{}
		l.topics[k] = t
	}
	if !t.holding && now.Sub(t.sent) >= l.every {
		t.sent = now
		return time.Time{}, false
	}
	if t.holding {
		l.skipped++
	}
	t.held, t.holding = m, true
	return t.sent.Add(l.every), true
}

// due appends the held messages whose interval has passed to out and
// returns it with the time the next one is due (zero if none is held). A
// topic idle for an interval is forgotten.
//
// A pass sends at most 2/livePasses of the topics, those due longest
// first, and any due for half an interval or more; the rest are due at
// once, for the next pass (a livePasses-th of an interval later, wait's
// floor). Topics whose devices publish all the time are held all the time
// and fall due one interval after their last send: without the cap, topics that once fell due together (the devices
// that were publishing when the first phone came) would go out together
// every interval after, and the phones' write loops with them, in one
// burst of every phone's delivery that delays the last phones by the
// burst and the ingest writer's commits and acks behind it. The cap
// spreads them over the interval once, and each keeps its own time after.
// A topic put off is sent a little late (half an interval at most, or at
// the first pass after), with the latest message of it.
func (l *liveFeed) due(now time.Time, out []fanMsg) ([]fanMsg, time.Time) {
	var next time.Time
	ready := l.ready[:0]
	for k, t := range l.topics {
		switch at := t.sent.Add(l.every); {
		case t.holding && !now.Before(at):
			ready = append(ready, readyTopic{at, t})
		case t.holding:
			if next.IsZero() || at.Before(next) {
				next = at
			}
		case !now.Before(at):
			delete(l.topics, k)
			l.stamps.forget(k.topic)
		}
	}
	if most := max(1, 2*len(l.topics)/livePasses); len(ready) > most {
		slices.SortFunc(ready, func(a, b readyTopic) int { return a.at.Compare(b.at) })
		// Those put off for half an interval go now: when passes come
		// late (a starved fan-out), the cap must not hold topics back.
		late := now.Add(-l.every / 2)
		for most < len(ready) && !ready[most].at.After(late) {
			most++
		}
		if most < len(ready) {
			clear(ready[most:])
			ready, next = ready[:most], now
		}
	}
	for _, r := range ready {
		out = append(out, r.t.held)
		r.t.held, r.t.holding, r.t.sent = fanMsg{}, false, now
	}
	clear(ready)
	l.ready = ready[:0]
	return out, next
}

// wait is how long to sleep until next: not less than a livePasses-th of
// the interval, so that topics falling due one by one are sent in a few
// passes per interval rather than one pass each.
func (l *liveFeed) wait(next, now time.Time) time.Duration {
	return max(next.Sub(now), l.every/livePasses)
}

// liveStamps holds, per topic, when the message the live mirror last
// published of it was committed: a phone's write of it (phoneHook's
// OnPacketSent) observes outpost_mqtt_live_delivery_duration_seconds from
// it. The fan-out writes it, phones' write loops read it. A topic is
// mirrored at most once per interval and sent to phones well within one,
// so the stamp is that of the message being written (a phone written to
// later than an interval after may be observed against the next one).
type liveStamps struct {
	m sync.Map // topic → *atomic.Int64 (Unix ns)
}

func (s *liveStamps) note(topic string, at int64) {
	if s == nil || at == 0 {
		return
	}
	if v, ok := s.m.Load(topic); ok {
		v.(*atomic.Int64).Store(at)
		return
	}
	v := new(atomic.Int64)
	v.Store(at)
	s.m.Store(topic, v)
}

// at is the commit time of topic's last mirrored message, or 0.
func (s *liveStamps) at(topic string) int64 {
	if s == nil {
		return 0
	}
	if v, ok := s.m.Load(topic); ok {
		return v.(*atomic.Int64).Load()
	}
	return 0
}

func (s *liveStamps) forget(topic string) {
	if s != nil {
		s.m.Delete(topic)
	}
}

// Forward routes a message the edge stored to the broker's subscribers, at
// qos with retain, without blocking (see fanout). In external-broker mode
// the edge feeds its phone-only broker through it after each commit.
func (b *Broker) Forward(topic string, payload []byte, qos byte, retain bool) {
	b.fan.forward(topic, payload, qos, retain)
}
