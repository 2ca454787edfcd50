package broker

import (
	"bufio"
	"bytes"
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
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
	t.Cleanup(func() { cli.Close() })
	_ = cli.SetDeadline(time.Now().Add(20 * time.Second))
	c := &v5conn{Conn: cli, r: bufio.NewReader(cli)}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: v,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 30,
			ClientIdentifier: id, UsernameFlag: true, Username: []byte("x"), PasswordFlag: true, Password: []byte(token)}}
	var buf bytes.Buffer
	if err := pk.ConnectEncode(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	if typ, body := c.read(t); typ != packets.Connack || len(body) < 2 || body[1] != 0 {
		t.Fatalf("CONNACK = type %d body %x", typ, body)
	}
	return c, lc
}

// subscribeV subscribes a version-v phone to filter at qos and returns the
// granted code.
func (c *v5conn) subscribeV(t *testing.T, v byte, id uint16, filter string, qos byte) byte {
	t.Helper()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, ProtocolVersion: v, PacketID: id,
		Filters: packets.Subscriptions{{Filter: filter, Qos: qos}}}
	var buf bytes.Buffer
	if err := pk.SubscribeEncode(&buf); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(buf.Bytes()); err != nil {
		t.Fatal(err)
	}
	typ, body := c.read(t)
	if typ != packets.Suback || len(body) < 3 {
		t.Fatalf("expected SUBACK, got type %d %x", typ, body)
	}
	return body[len(body)-1]
}

// readPubV reads a PUBLISH of a version-v session: topic, payload, QoS.
func (c *v5conn) readPubV(t *testing.T, v byte) (string, string, byte) {
	t.Helper()
	h, err := c.r.Peek(1)
	if err != nil {
		t.Fatal(err)
	}
	qos := (h[0] >> 1) & 3
	typ, body := c.read(t)
	if typ != packets.Publish {
		t.Fatalf("expected a PUBLISH, got type %d %x", typ, body)
	}
	pk := packets.Packet{ProtocolVersion: v, FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos}}
	if err := pk.PublishDecode(body); err != nil {
		t.Fatalf("PUBLISH %x: %v", body, err)
	}
	return pk.TopicName, string(pk.Payload), qos
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
		if got := s.c.subscribeV(t, s.v, 1, s.f, s.q); got != s.q {
			t.Fatalf("SUBACK %s = %#x, want %#x", s.f, got, s.q)
		}
	}

	b.Forward("sensors/d1/telemetry", []byte("direct"), 1, false)
	for _, p := range []struct {
		c *v5conn
		v byte
	}{{p4, 4}, {p5, 5}} {
		if topic, body, qos := p.c.readPubV(t, p.v); topic != "sensors/d1/telemetry" || body != "direct" || qos != 0 {
			t.Fatalf("v%d phone got %s %q at QoS %d, want sensors/d1/telemetry \"direct\" at 0", p.v, topic, body, qos)
		}
	}
	if c4.direct.Load() != 1 || c5.direct.Load() != 1 {
		t.Fatalf("direct writes: v4 %d, v5 %d; want 1 each", c4.direct.Load(), c5.direct.Load())
	}

	// d2 has a QoS 1 phone: mochi routes it, to both.
	b.Forward("sensors/d2/telemetry", []byte("mochi"), 1, false)
	if topic, body, qos := q1.readPubV(t, 4); topic != "sensors/d2/telemetry" || body != "mochi" || qos != 1 {
		t.Fatalf("QoS 1 phone got %s %q at QoS %d", topic, body, qos)
	}
	if topic, body, _ := p4.readPubV(t, 4); topic != "sensors/d2/telemetry" || body != "mochi" {
		t.Fatalf("QoS 0 phone got %s %q", topic, body)
	}
	if c4.direct.Load() != 1 || cq.direct.Load() != 0 {
		t.Fatalf("direct writes after d2: %d, %d; want none more", c4.direct.Load(), cq.direct.Load())
	}

	// Retained: through mochi, and kept.
	b.Forward("sensors/d1/state", []byte("kept"), 0, true)
	if got := p5.subscribeV(t, 5, 2, "sensors/d1/state", 0); got != 0 {
		t.Fatalf("SUBACK state %#x", got)
	}
	if topic, body, _ := p5.readPubV(t, 5); topic != "sensors/d1/state" || body != "kept" {
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
		if got := c.subscribeV(t, 4, 1, "sensors/d1/telemetry", 0); got != 0 {
			t.Fatalf("SUBACK %#x", got)
		}
	}
	cb.busy.Store(1)
	cs.fail.Store(true)
	b.Forward("sensors/d1/telemetry", []byte("m1"), 0, false)
	if topic, body, _ := busy.readPubV(t, 4); topic != "sensors/d1/telemetry" || body != "m1" {
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
		return counterValue(t, reg, "outpost_mqtt_phone_ends_total", "slow") == 1
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
	if topic, body, _ := busy.readPubV(t, 4); topic != "sensors/d1/telemetry" || body != "m2" {
		t.Fatalf("busy phone got %s %q, want m2", topic, body)
	}
	if cb.direct.Load() != 1 {
		t.Fatalf("direct writes %d after the flusher ended, want 1", cb.direct.Load())
	}
}

// counterValue is the value of counter name with label value label in reg
// (0 if absent).
func counterValue(t *testing.T, reg *prometheus.Registry, name, label string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetValue() == label {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

// TestPhoneReconnectGetsRetained: a phone that comes back under the same
// client id, after closing its connection or while the old one is still
// open (a half-open connection after a network change), gets the
// retained messages of what it subscribes to again.
func TestPhoneReconnectGetsRetained(t *testing.T) {
	u := &fakeSession{openid: "u1", exp: time.Now().Add(time.Hour), read: map[string]bool{"d1": true}}
	b := startBroker(t, Config{Phones: &fakePhones{sessions: map[string]*fakeSession{"ok": u}}, LiveInterval: time.Millisecond}, nil)
	b.Forward("sensors/d1/state", []byte("s1"), 0, true)
	for _, v := range []byte{4, 5} {
		first, _ := livePhone(t, b, "ok", "app", v)
		if got := first.subscribeV(t, v, 1, "sensors/d1/state", 0); got != 0 {
			t.Fatalf("v%d: SUBACK %#x", v, got)
		}
		if topic, body, _ := first.readPubV(t, v); topic != "sensors/d1/state" || body != "s1" {
			t.Fatalf("v%d: first connection got %s %q", v, topic, body)
		}
		// Still open: the second connection takes the session over.
		second, _ := livePhone(t, b, "ok", "app", v)
		if got := second.subscribeV(t, v, 1, "sensors/d1/state", 0); got != 0 {
			t.Fatalf("v%d: SUBACK %#x", v, got)
		}
		if topic, body, _ := second.readPubV(t, v); topic != "sensors/d1/state" || body != "s1" {
			t.Fatalf("v%d: taking over, got %s %q, want the retained s1", v, topic, body)
		}
		second.Close()
		third, _ := livePhone(t, b, "ok", "app", v)
		if got := third.subscribeV(t, v, 1, "sensors/d1/state", 0); got != 0 {
			t.Fatalf("v%d: SUBACK %#x", v, got)
		}
		if topic, body, _ := third.readPubV(t, v); topic != "sensors/d1/state" || body != "s1" {
			t.Fatalf("v%d: after a close, got %s %q, want the retained s1", v, topic, body)
		}
		third.Close()
	}
}
