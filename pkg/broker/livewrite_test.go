package broker

import (
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/internal/daemontest"
)

// testLiveConn is the server end of a phone's TCP connection as a
// LiveConn, with pkg/api's wsConn's contract (one writer at a time, a
// busy connection refused, a bounded write), and knobs: busy refuses the
// next WriteLive calls, fail makes the next one fail as a full socket's
// write does.
type testLiveConn struct {
	net.Conn
	mu     sync.Mutex
	direct atomic.Int64 // packets WriteLive wrote (or began to)
	busy   atomic.Int32
	fail   atomic.Bool
}

func (c *testLiveConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.Conn.Write(p)
}

func (c *testLiveConn) WriteLive(p []byte, timeout time.Duration) (bool, error) {
	if c.busy.Load() > 0 {
		c.busy.Add(-1)
		return false, nil
	}
	if !c.mu.TryLock() {
		return false, nil
	}
	defer c.mu.Unlock()
	if c.fail.Load() {
		return true, os.ErrDeadlineExceeded
	}
	c.direct.Add(1) // before the write: the test may have read it before Write returns
	_ = c.Conn.SetWriteDeadline(time.Now().Add(timeout))
	defer c.Conn.SetWriteDeadline(time.Time{})
	_, err := c.Conn.Write(p)
	return true, err
}

// idle waits until no write holds the connection. A client reads a
// packet before its writer's Write has returned and let go of the lock,
// so a live write right after a SUBACK could find the connection busy.
func (c *testLiveConn) idle(t *testing.T) {
	t.Helper()
	daemontest.Poll(t, 5*time.Second, "the phone's connection idle", func() bool {
		if !c.mu.TryLock() {
			return false
		}
		c.mu.Unlock()
		return true
	})
}

// livePhone connects a phone of protocol version v (4 or 5) over loopback
// TCP with a testLiveConn as the broker's end, and returns the client end
// after a successful CONNACK.
func livePhone(t *testing.T, b *Broker, token, id string, v byte) (*v5conn, *testLiveConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cli, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	lc := &testLiveConn{Conn: srv}
	go func() { _ = b.ServePhone(lc) }()
	c, code := phoneConnect(t, cli, token, id, v)
	if code != 0 {
		t.Fatalf("CONNACK reason %#x", code)
	}
	return c, lc
}

// TestLiveDirectWrites: live messages to QoS 0 phones on a LiveConn go
// through WriteLive, as well-formed PUBLISHes of each phone's protocol
// version under the topic subscribed to; a topic with a QoS 1 phone on it
// goes through mochi for all (a packet id, a PUBACK); retained messages go
// through mochi (and are kept for later phones).
func TestLiveDirectWrites(t *testing.T) {
	sess := func(id string) *fakeSession {
		return &fakeSession{openid: id, exp: time.Now().Add(time.Hour), read: map[string]bool{"d1": true, "d2": true}}
	}
	b := startBroker(t, Config{Phones: &fakePhones{sessions: map[string]*fakeSession{"a": sess("a"), "b": sess("b"), "c": sess("c")}}, LiveInterval: time.Millisecond}, nil)
	p4, c4 := livePhone(t, b, "a", "p4", 4)
	p5, c5 := livePhone(t, b, "b", "p5", 5)
	q1, cq := livePhone(t, b, "c", "q1", 4)
	for _, s := range []struct {
		c *v5conn
		v byte
		f string
		q byte
	}{{p4, 4, "sensors/d1/telemetry", 0}, {p5, 5, "sensors/d1/telemetry", 0}, {p4, 4, "sensors/d2/telemetry", 0}, {q1, 4, "sensors/d2/telemetry", 1}} {
		if got := s.c.subscribeAs(t, s.v, 1, map[string]byte{s.f: s.q})[s.f]; got != s.q {
			t.Fatalf("SUBACK %s = %#x, want %#x", s.f, got, s.q)
		}
	}

	for _, c := range []*testLiveConn{c4, c5, cq} {
		c.idle(t)
	}
	b.Forward("sensors/d1/telemetry", []byte("direct"), 1, false)
	for _, p := range []struct {
		c *v5conn
		v byte
	}{{p4, 4}, {p5, 5}} {
		if topic, body, qos := p.c.readPubAs(t, p.v); topic != "sensors/d1/telemetry" || body != "direct" || qos != 0 {
			t.Fatalf("v%d phone got %s %q at QoS %d, want sensors/d1/telemetry \"direct\" at 0", p.v, topic, body, qos)
		}
	}
	if c4.direct.Load() != 1 || c5.direct.Load() != 1 {
		t.Fatalf("direct writes: v4 %d, v5 %d; want 1 each", c4.direct.Load(), c5.direct.Load())
	}

	// d2 has a QoS 1 phone: mochi routes it, to both.
	b.Forward("sensors/d2/telemetry", []byte("mochi"), 1, false)
	if topic, body, qos := q1.readPubAs(t, 4); topic != "sensors/d2/telemetry" || body != "mochi" || qos != 1 {
		t.Fatalf("QoS 1 phone got %s %q at QoS %d", topic, body, qos)
	}
	if topic, body, _ := p4.readPubAs(t, 4); topic != "sensors/d2/telemetry" || body != "mochi" {
		t.Fatalf("QoS 0 phone got %s %q", topic, body)
	}
	if c4.direct.Load() != 1 || cq.direct.Load() != 0 {
		t.Fatalf("direct writes after d2: %d, %d; want none more", c4.direct.Load(), cq.direct.Load())
	}

	// Retained: through mochi, and kept.
	b.Forward("sensors/d1/state", []byte("kept"), 0, true)
	if got := p5.subscribeAs(t, 5, 2, map[string]byte{"sensors/d1/state": 0})["sensors/d1/state"]; got != 0 {
		t.Fatalf("SUBACK state %#x", got)
	}
	if topic, body, _ := p5.readPubAs(t, 5); topic != "sensors/d1/state" || body != "kept" {
		t.Fatalf("v5 phone got %s %q, want the retained state", topic, body)
	}
	if c5.direct.Load() != 1 {
		t.Fatalf("a retained message was written directly")
	}
}

// TestLiveDirectBusyAndSlow: a phone whose connection is busy at a direct
// write gets the topic's latest message from its flusher, nothing lost
// or reordered; a phone whose write fails (its socket buffer full past the
// timeout) is disconnected and counted as slow, and the others keep
// getting their feed.
func TestLiveDirectBusyAndSlow(t *testing.T) {
	sess := func(id string) *fakeSession {
		return &fakeSession{openid: id, exp: time.Now().Add(time.Hour), read: map[string]bool{"d1": true}}
	}
	reg := prometheus.NewRegistry()
	b := startBroker(t, Config{Phones: &fakePhones{sessions: map[string]*fakeSession{"a": sess("a"), "b": sess("b")}}, LiveInterval: time.Millisecond, Registerer: reg}, nil)
	busy, cb := livePhone(t, b, "a", "busy", 4)
	slow, cs := livePhone(t, b, "b", "slow", 4)
	for _, c := range []*v5conn{busy, slow} {
		if got := c.subscribeAs(t, 4, 1, map[string]byte{"sensors/d1/telemetry": 0})["sensors/d1/telemetry"]; got != 0 {
			t.Fatalf("SUBACK %#x", got)
		}
	}
	cb.idle(t)
	cs.idle(t)
	cb.busy.Store(1)
	cs.fail.Store(true)
	b.Forward("sensors/d1/telemetry", []byte("m1"), 0, false)
	if topic, body, _ := busy.readPubAs(t, 4); topic != "sensors/d1/telemetry" || body != "m1" {
		t.Fatalf("busy phone got %s %q, want m1 from its flusher", topic, body)
	}
	if cb.direct.Load() != 0 {
		t.Fatalf("the busy write went through WriteLive")
	}
	_ = slow.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := slow.r.ReadByte(); !errors.Is(err, net.ErrClosed) && err == nil {
		t.Fatalf("slow phone's connection still open after a failed live write")
	}
	daemontest.Poll(t, 5*time.Second, "the slow phone counted", func() bool {
		return daemontest.Metric(t, reg, "outpost_mqtt_phone_ends_total", "reason", "slow") == 1
	})
	daemontest.Poll(t, 5*time.Second, "the busy phone's flusher to end", func() bool {
		b.phones.mu.RLock()
		defer b.phones.mu.RUnlock()
		for _, ps := range b.phones.sessions {
			ps.lmu.Lock()
			f := ps.flushing
			ps.lmu.Unlock()
			if f {
				return false
			}
		}
		return true
	})
	b.Forward("sensors/d1/telemetry", []byte("m2"), 0, false)
	if topic, body, _ := busy.readPubAs(t, 4); topic != "sensors/d1/telemetry" || body != "m2" {
		t.Fatalf("busy phone got %s %q, want m2", topic, body)
	}
	if cb.direct.Load() != 1 {
		t.Fatalf("direct writes %d after the flusher ended, want 1", cb.direct.Load())
	}
}

// TestPhoneReconnectGetsRetained: a phone that comes back under the same
// client id, after closing its connection or while the old one is still
// open (a half-open connection after a network change), gets the
// retained messages of what it subscribes to again.
func TestPhoneReconnectGetsRetained(t *testing.T) {
	u := &fakeSession{openid: "u1", exp: time.Now().Add(time.Hour), read: map[string]bool{"d1": true}}
	b := startBroker(t, Config{Phones: &fakePhones{sessions: map[string]*fakeSession{"ok": u}}, LiveInterval: time.Millisecond}, nil)
	b.Forward("sensors/d1/state", []byte("s1"), 0, true)
	// connect subscribes a phone of version v to the retained state and
	// checks it comes.
	connect := func(v byte, when string) *v5conn {
		t.Helper()
		c, _ := livePhone(t, b, "ok", "app", v)
		if got := c.subscribeAs(t, v, 1, map[string]byte{"sensors/d1/state": 0})["sensors/d1/state"]; got != 0 {
			t.Fatalf("v%d: SUBACK %#x", v, got)
		}
		if topic, body, _ := c.readPubAs(t, v); topic != "sensors/d1/state" || body != "s1" {
			t.Fatalf("v%d: %s, got %s %q, want the retained s1", v, when, topic, body)
		}
		return c
	}
	for _, v := range []byte{4, 5} {
		connect(v, "first connection")
		connect(v, "taking over").Close() // the first is still open
		connect(v, "after a close").Close()
	}
}
