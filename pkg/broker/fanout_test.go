package broker

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

type got struct {
	qos    byte
	retain bool
	body   string
}

func subscribe(t *testing.T, c *client, filter string, qos byte) <-chan got {
	t.Helper()
	ch := make(chan got, 16)
	waitTok(t, c.Subscribe(filter, qos, func(_ paho.Client, m paho.Message) {
		ch <- got{m.Qos(), m.Retained(), string(m.Payload())}
	}), "subscribe "+filter)
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
// message's payload.
type recorder chan string

func (r recorder) Publish(_ string, payload []byte, _ bool, _ byte) error {
	r <- string(payload)
	return nil
}

// TestFanoutPacedWhileBehind: a round that had to conflate holds the next
// one until the interval has passed since it began (nothing is routed
// meanwhile, and what queued up is conflated to each topic's latest), and
// a round that kept up never pauses the next. The pause is the test's, so
// nothing here depends on timing.
func TestFanoutPacedWhileBehind(t *testing.T) {
	const every = time.Hour
	out := make(recorder, 64)
	f := newFanout(out, 64, every, newMetrics(nil), slog.New(slog.DiscardHandler))
	paused, resume := make(chan time.Duration, 1), make(chan struct{})
	f.pause = func(ctx context.Context, d time.Duration) bool {
		paused <- d
		select {
		case <-resume:
			return true
		case <-ctx.Done():
			return false
		}
	}
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
	waitPause := func() {
		t.Helper()
		select {
		case d := <-paused:
			if d <= 0 || d > every {
				t.Fatalf("paused %v, want (0, %v]", d, every)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the round after a conflated one did not pause")
		}
	}
	// Queued before the fan-out runs, so the first round takes all three.
	for _, m := range []string{"a1", "a2", "b1"} {
		f.forward("sensors/"+m[:1]+"/telemetry", []byte(m), 0, false)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); f.run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	expect("a2", "b1") // behind: the round conflated

	f.forward("sensors/c/telemetry", []byte("c1"), 0, false)
	waitPause()
	f.forward("sensors/c/telemetry", []byte("c2"), 0, false)
	f.forward("sensors/d/telemetry", []byte("d1"), 0, false)
	select {
	case got := <-out:
		t.Fatalf("routed %q during the pause", got)
	default:
	}
	resume <- struct{}{}
	expect("c2", "d1") // still behind: c conflated

	f.forward("sensors/e/telemetry", []byte("e1"), 0, false)
	waitPause()
	resume <- struct{}{}
	expect("e1") // kept up: the next round starts at once
	f.forward("sensors/f/telemetry", []byte("f1"), 0, false)
	expect("f1")
	select {
	case <-paused:
		t.Fatal("paused after a round that kept up")
	default:
	}
}
