package broker

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/internal/daemontest"
)

type got struct {
	qos    byte
	retain bool
	body   string
}

// subscribe subscribes c to filter at qos and returns what it receives.
// It returns once the broker has sent the filter's retained messages:
// mochi writes the SUBACK before it looks them up, so a retained message
// published in between reaches the subscriber twice, live and retained
// (README "MQTT contract"); the UNSUBACK of a second packet, which mochi
// reads only after the SUBSCRIBE is done with, closes that window.
func subscribe(t *testing.T, c *client, filter string, qos byte) <-chan got {
	t.Helper()
	ch := make(chan got, 16)
	waitTok(t, c.Subscribe(filter, qos, func(_ paho.Client, m paho.Message) {
		ch <- got{m.Qos(), m.Retained(), string(m.Payload())}
	}), "subscribe "+filter)
	waitTok(t, c.Unsubscribe("outpost/test/none"), "unsubscribe after subscribing to "+filter)
	return ch
}

func receive(t *testing.T, ch <-chan got, what string) got {
	t.Helper()
	select {
	case g := <-ch:
		return g
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: nothing received within 10s", what)
	}
	return got{}
}

// TestSensorFanoutQoSAndRetain: a stored sensors/ message reaches TCP
// subscribers of sensors/# at every publish QoS (before, only QoS 2 was
// routed: the ingest hook takes QoS 0 and 1 away from mochi to ack after
// the commit), each at the lesser of the publish and subscription QoS; a
// live delivery carries retain 0 (MQTT-3.3.1-9), and a retained message is
// kept for later subscribers, who get it with retain 1.
func TestSensorFanoutQoSAndRetain(t *testing.T) {
	e := newEnv(t, Config{})
	addr := e.b.Addr()
	var subs [3]<-chan got
	for q := range byte(3) {
		subs[q] = subscribe(t, mustDial(t, addr, fmt.Sprintf("dash%d", q), "", ""), "sensors/#", q)
	}
	dev := mustDial(t, addr, "pub", "", "")
	i := 0
	for pubQoS := range byte(3) {
		for _, retain := range []bool{false, true} {
			i++
			name := fmt.Sprintf("qos%d retain=%v", pubQoS, retain)
			topic := fmt.Sprintf("sensors/d%d/telemetry", i)
			body := fmt.Sprintf(`{"ts": %d, "metrics": {"n": %d}}`, time.Now().UnixMilli(), i)
			waitTok(t, dev.Publish(topic, pubQoS, retain, body), name+": publish")
			for subQoS := range byte(3) {
				g := receive(t, subs[subQoS], name)
				if want := min(pubQoS, subQoS); g.qos != want || g.retain || g.body != body {
					t.Errorf("%s: subscriber at QoS %d got %+v, want qos %d, retain false, %s", name, subQoS, g, want, body)
				}
			}
			if !retain {
				continue
			}
			late := subscribe(t, mustDial(t, addr, fmt.Sprintf("late%d", i), "", ""), topic, 1)
			if g := receive(t, late, name+": late subscriber"); g.qos != min(pubQoS, 1) || !g.retain || g.body != body {
				t.Errorf("%s: late subscriber got %+v, want the retained message at qos %d with retain 1", name, g, min(pubQoS, 1))
			}
		}
	}
}

// TestConflate: when routing is behind, each topic's latest retained and
// latest non-retained message are kept, in publish order.
func TestConflate(t *testing.T) {
	m := func(topic string, n int, retain bool) fanMsg {
		return fanMsg{topic: topic, payload: []byte(fmt.Sprint(n)), retain: retain}
	}
	for _, tc := range []struct {
		name       string
		batch, out []fanMsg
	}{
		{"one", []fanMsg{m("a", 1, false)}, []fanMsg{m("a", 1, false)}},
		{"latest per topic", []fanMsg{m("a", 1, false), m("b", 2, false), m("a", 3, false)},
			[]fanMsg{m("b", 2, false), m("a", 3, false)}},
		{"retained", []fanMsg{m("a", 1, true), m("a", 2, false), m("a", 3, false), m("a", 4, true), m("b", 5, true)},
			[]fanMsg{m("a", 3, false), m("a", 4, true), m("b", 5, true)}},
		{"retained then live", []fanMsg{m("a", 1, true), m("a", 2, false)},
			[]fanMsg{m("a", 1, true), m("a", 2, false)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := conflate(append([]fanMsg(nil), tc.batch...), map[fanKey]int{})
			if fmt.Sprint(got) != fmt.Sprint(tc.out) {
				t.Fatalf("conflate = %v, want %v", got, tc.out)
			}
		})
	}
}

// recorder is the fan-out's publisher in tests: it hands over each routed
// message as topic=payload.
type recorder chan string

func (r recorder) Publish(topic string, payload []byte, _ bool, _ byte) error {
	r <- topic + "=" + string(payload)
	return nil
}

// TestLiveFeedRate: a topic's first message goes to phones at once; those
// within the interval after it are held, each replacing the last, and the
// latest goes when the interval has passed; retained messages have their
// own rate; an idle topic is forgotten.
func TestLiveFeedRate(t *testing.T) {
	const every = 100 * time.Millisecond
	t0 := time.Unix(1000, 0)
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	m := func(topic, body string, retain bool) fanMsg {
		return fanMsg{topic: topic, payload: []byte(body), retain: retain}
	}
	l := newLiveFeed(every)
	offer := func(ms int, msg fanMsg, wantHeld bool, wantUntil int) {
		t.Helper()
		until, held := l.offer(msg, at(ms))
		if held != wantHeld || held && !until.Equal(at(wantUntil)) {
			t.Fatalf("offer %s at %dms: held %v until %v, want held %v until %dms", msg.payload, ms, held, until.Sub(t0), wantHeld, wantUntil)
		}
	}
	due := func(ms int, wantNext int, want ...string) {
		t.Helper()
		out, next := l.due(at(ms), nil)
		var got []string
		for _, m := range out {
			got = append(got, string(m.payload))
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("due at %dms = %v, want %v", ms, got, want)
		}
		if wantNext < 0 && !next.IsZero() || wantNext >= 0 && !next.Equal(at(wantNext)) {
			t.Fatalf("due at %dms: next %v, want %dms", ms, next.Sub(t0), wantNext)
		}
	}
	offer(0, m("a", "a1", false), false, 0)
	offer(10, m("a", "a2", false), true, 100)
	offer(20, m("a", "a3", false), true, 100)
	offer(25, m("a", "r1", true), false, 0) // retained: its own rate
	offer(30, m("b", "b1", false), false, 0)
	due(50, 100)
	if l.skipped != 1 {
		t.Fatalf("skipped %d, want 1 (a2)", l.skipped)
	}
	due(100, -1, "a3")
	offer(150, m("a", "a4", false), true, 200)
	due(210, -1, "a4")
	if _, ok := l.topics[fanKey{topic: "b"}]; ok || len(l.topics) != 1 {
		t.Fatalf("topics idle for an interval not forgotten: %v", l.topics)
	}
	offer(400, m("a", "a5", false), false, 0)
}

// TestFanoutLiveMirror: TCP subscribers get every stored message, in
// order; the phones' mirror ($live/) gets a topic's first at once and
// holds the rest within the interval (here an hour, so a held message
// never goes out during the test); without phones only retained messages
// are mirrored.
func TestFanoutLiveMirror(t *testing.T) {
	out := make(recorder, 64)
	var phones atomic.Bool
	phones.Store(true)
	f := newFanout(out, 64, time.Hour, phones.Load, newMetrics(nil), slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); f.run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	expect := func(want ...string) {
		t.Helper()
		for _, w := range want {
			select {
			case got := <-out:
				if got != w {
					t.Fatalf("routed %q, want %q", got, w)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("%q not routed within 10s", w)
			}
		}
	}
	f.forward("sensors/a/telemetry", []byte("1"), 1, false)
	expect("sensors/a/telemetry=1", "$live/sensors/a/telemetry=1")
	f.forward("sensors/a/telemetry", []byte("2"), 1, false)
	expect("sensors/a/telemetry=2") // held for phones
	f.forwardLive("sensors/b/telemetry", []byte("q2"), 2, false)
	expect("$live/sensors/b/telemetry=q2") // mochi routed it to TCP
	phones.Store(false)
	f.forward("sensors/c/telemetry", []byte("3"), 0, false)
	f.forward("sensors/c/state", []byte("s"), 1, true)
	expect("sensors/c/telemetry=3", "sensors/c/state=s", "$live/sensors/c/state=s")
	select {
	case got := <-out:
		t.Fatalf("routed %q, want nothing more", got)
	default:
	}
}

// countingPublisher counts publishes per topic.
type countingPublisher struct {
	mu sync.Mutex
	n  map[string]int
}

func (c *countingPublisher) Publish(topic string, _ []byte, _ bool, _ byte) error {
	c.mu.Lock()
	c.n[topic]++
	c.mu.Unlock()
	return nil
}

// TestLiveFeedUnderLoad: with topics out of step (their intervals end at
// different times) and messages arriving all the time, every topic still
// reaches phones about once per interval. The timer that sends held
// messages was pushed back by each batch, and phones got each topic's
// first message only.
func TestLiveFeedUnderLoad(t *testing.T) {
	const (
		topics   = 20
		interval = 40 * time.Millisecond
		run      = time.Second
	)
	out := &countingPublisher{n: map[string]int{}}
	f := newFanout(out, 4096, interval, func() bool { return true }, newMetrics(nil), slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); f.run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	start := time.Now()
	for i := 0; time.Since(start) < run; i++ {
		// Topic k starts k milliseconds in, so their intervals are out of step.
		for k := 0; k < topics && k <= i; k++ {
			f.forward(fmt.Sprintf("sensors/d%d/telemetry", k), []byte("x"), 0, false)
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	<-done
	out.mu.Lock()
	defer out.mu.Unlock()
	for k := 0; k < topics; k++ {
		// About run/interval = 25 each; a loaded machine gets fewer.
		if got := out.n[livePrefix+fmt.Sprintf("sensors/d%d/telemetry", k)]; got < 8 {
			t.Errorf("topic %d reached phones %d times in %s at one per %s, want about %d", k, got, run, interval, run/interval)
		}
	}
}

// TestLiveFeedSpreadsTopics: topics that fall due together (every device
// publishing all the time since the first phone came) are spread over the
// interval: no pass sends more than 2/livePasses of them, those put off go
// in the next passes, and once spread each keeps its own time, so that
// phones' deliveries do not come in one burst every interval. Every topic
// still reaches phones about once per interval, never twice within one,
// and always with its latest message; when passes come late (a starved
// fan-out), the cap does not hold topics back more than half an interval.
func TestLiveFeedSpreadsTopics(t *testing.T) {
	const (
		every  = 100 * time.Millisecond
		topics = 40
		most   = 2 * topics / livePasses
	)
	for _, tc := range []struct {
		name   string
		starve time.Duration // passes come no sooner than this after the last
	}{
		{"on time", 0},
		{"starved", 40 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t0 := time.Unix(1000, 0)
			l := newLiveFeed(every)
			topic := func(k int) string { return fmt.Sprintf("sensors/d%d/telemetry", k) }
			sent := map[string][]time.Duration{}
			last := map[string]string{}
			offer := func(now time.Time, k int) {
				m := fanMsg{topic: topic(k), payload: []byte(fmt.Sprint(now.Sub(t0)))}
				last[m.topic] = string(m.payload)
				if _, held := l.offer(m, now); !held {
					sent[m.topic] = append(sent[m.topic], now.Sub(t0))
				}
			}
			// The fan-out's timer: a pass when the next is due, not
			// sooner than wait allows after the last one.
			var wakeAt time.Time
			arm := func(next, now time.Time) {
				if !next.IsZero() {
					wakeAt = now.Add(max(l.wait(next, now), tc.starve))
				}
			}
			for k := range topics {
				offer(t0, k)
			}
			arm(t0.Add(every), t0)
			passes, biggest := 0, 0
			for now := t0.Add(time.Millisecond); now.Before(t0.Add(10 * every)); now = now.Add(time.Millisecond) {
				for k := range topics { // every device publishes every millisecond
					offer(now, k)
				}
				if now.Before(wakeAt) {
					continue
				}
				out, next := l.due(now, nil)
				passes++
				if tc.starve == 0 && len(out) > most {
					t.Fatalf("pass at %v sent %d topics, want at most %d", now.Sub(t0), len(out), most)
				}
				if now.After(t0.Add(3*every)) && len(out) > biggest {
					biggest = len(out)
				}
				for _, m := range out {
					if string(m.payload) != last[m.topic] {
						t.Fatalf("pass at %v sent %s %s, want its latest %s", now.Sub(t0), m.topic, m.payload, last[m.topic])
					}
					sent[m.topic] = append(sent[m.topic], now.Sub(t0))
				}
				arm(next, now)
			}
			for k := range topics {
				s := sent[topic(k)]
				for i := 1; i < len(s); i++ {
					// Due one interval after the last send, put off by
					// half an interval at most, then the next pass.
					if gap := s[i] - s[i-1]; gap < every || gap > every+every/2+max(tc.starve, every/livePasses) {
						t.Fatalf("%s sent at %v: a gap of %v", topic(k), s, gap)
					}
				}
				if len(s) < 6 {
					t.Fatalf("%s sent %d times in 10 intervals, want about 10", topic(k), len(s))
				}
			}
			t.Logf("%d passes in 10 intervals, at most %d topics each once spread", passes, biggest)
		})
	}
}

// TestLiveFeedSendsWithTheNextBatch: held messages that fall due go out
// with the next batch of stored messages (the freshest there will be)
// rather than when the timer finds them due, and without one, a
// livePasses-th of the interval later.
func TestLiveFeedSendsWithTheNextBatch(t *testing.T) {
	const every = 2 * time.Second
	out := make(recorder, 64)
	f := newFanout(out, 64, every, func() bool { return true }, newMetrics(nil), slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); f.run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	next := func(what string) string {
		t.Helper()
		for {
			select {
			case got := <-out:
				if strings.HasPrefix(got, livePrefix) {
					return got
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("%s: nothing mirrored within 10s", what)
			}
		}
	}
	const topic = "sensors/a/telemetry"
	start := time.Now()
	f.forward(topic, []byte("first"), 0, false)
	if got := next("first"); got != livePrefix+topic+"=first" {
		t.Fatalf("mirrored %q, want the first message at once", got)
	}
	f.forward(topic, []byte("held"), 0, false)
	// Due an interval after the first went (after start); the timer finds
	// it then, and a batch comes 10 ms later, well within the 100 ms the
	// pass waits for one.
	time.Sleep(time.Until(start.Add(every + 10*time.Millisecond)))
	f.forward(topic, []byte("fresh"), 0, false)
	if got := next("held"); got != livePrefix+topic+"=fresh" {
		t.Fatalf("mirrored %q, want the batch that came after the topic fell due (fresh)", got)
	}
	// Without a batch, the held message goes a little after it is due.
	f.forward(topic, []byte("alone"), 0, false)
	if got := next("alone"); got != livePrefix+topic+"=alone" {
		t.Fatalf("mirrored %q, want alone", got)
	}
}

// stalled is a fan-out publisher that blocks until release is closed,
// saying on entered when it first blocks.
type stalled struct {
	entered, release chan struct{}
	once             sync.Once
}

func (s *stalled) Publish(string, []byte, bool, byte) error {
	s.once.Do(func() { close(s.entered) })
	<-s.release
	return nil
}

// TestFanoutNeverDelaysAcks: with routing stalled (here: its publisher
// blocks; in production a slow state-file write or a CPU-starved
// goroutine), devices' QoS 1 messages are still stored and acknowledged;
// what the fan-out's queue cannot take is dropped and counted, not waited
// for.
func TestFanoutNeverDelaysAcks(t *testing.T) {
	const queue, extra = 4, 20
	s := &stalled{entered: make(chan struct{}), release: make(chan struct{})}
	reg := prometheus.NewRegistry()
	e := newEnv(t, Config{FanoutQueue: queue, Registerer: reg, fanoutVia: s})
	t.Cleanup(func() { close(s.release) }) // before the broker's Close, which waits for the fan-out
	dev := mustDial(t, e.b.Addr(), "d1", "", "")
	msg := func(n int) string { return fmt.Sprintf(`{"ts": %d, "metrics": {"n": %d}}`, time.Now().UnixMilli(), n) }
	waitTok(t, dev.Publish("sensors/d1/telemetry", 1, false, msg(0)), "publish 0")
	select {
	case <-s.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the fan-out did not route the first message within 10s")
	}
	for n := 1; n <= extra; n++ {
		waitTok(t, dev.Publish("sensors/d1/telemetry", 1, false, msg(n)), fmt.Sprintf("publish %d with routing stalled", n))
	}
	if got, want := daemontest.Metric(t, reg, "outpost_mqtt_fanout_dropped_total"), float64(extra-queue); got != want {
		t.Fatalf("fanout_dropped_total = %v, want %v (the queue holds %d)", got, want, queue)
	}
	if n := e.st.Counts().Readings; n != extra+1 {
		t.Fatalf("stored %d readings, want %d", n, extra+1)
	}
}
