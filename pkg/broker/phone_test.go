package broker

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"
)

// fakePhones admits the tokens it holds.
type fakePhones struct{ sessions map[string]*fakeSession }

func (f *fakePhones) Authenticate(token string) (PhoneSession, error) {
	if s, ok := f.sessions[token]; ok {
		return s, nil
	}
	return nil, errors.New("bad token")
}

type fakeSession struct {
	openid  string
	exp     time.Time
	revoked atomic.Bool
	mu      sync.Mutex
	read    map[string]bool
}

func (s *fakeSession) OpenID() string       { return s.openid }
func (s *fakeSession) ExpiresAt() time.Time { return s.exp }
func (s *fakeSession) Revoked() bool        { return s.revoked.Load() }
func (s *fakeSession) MayRead(_ context.Context, dev string) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.read[dev], nil
}

// phoneV5 opens an MQTT 5 phone session through ServePhone over a pipe and
// returns the client end after CONNACK, with the CONNACK reason code.
func phoneV5(t *testing.T, b *Broker, token string) (*v5conn, byte) {
	t.Helper()
	cli, srv := net.Pipe()
	go func() { _ = b.ServePhone(srv) }()
	return phoneConnect(t, cli, token, "app", 5)
}

// phoneConnect sends a version-v CONNECT with token as the password on
// cli, the client's end of a phone's connection, and returns the session
// after CONNACK, with the CONNACK reason code.
func phoneConnect(t *testing.T, cli net.Conn, token, id string, v byte) (*v5conn, byte) {
	t.Helper()
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
	go func() { _, _ = cli.Write(buf.Bytes()) }() // a pipe's write waits for the read
	typ, body := c.read(t)
	if typ != packets.Connack || len(body) < 2 {
		t.Fatalf("CONNACK = type %d body %x", typ, body)
	}
	return c, body[1]
}

// subscribe subscribes an MQTT 5 session to filters (filter → QoS) and
// returns each filter's SUBACK code.
func (c *v5conn) subscribe(t *testing.T, id uint16, filters map[string]byte) map[string]byte {
	t.Helper()
	return c.subscribeAs(t, 5, id, filters)
}

// subscribeAs is subscribe for a session of protocol version v.
func (c *v5conn) subscribeAs(t *testing.T, v byte, id uint16, filters map[string]byte) map[string]byte {
	t.Helper()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, ProtocolVersion: v, PacketID: id}
	var order []string
	for f, q := range filters {
		pk.Filters = append(pk.Filters, packets.Subscription{Filter: f, Qos: q})
		order = append(order, f)
	}
	var buf bytes.Buffer
	if err := pk.SubscribeEncode(&buf); err != nil {
		t.Fatal(err)
	}
	go func() { _, _ = c.Write(buf.Bytes()) }()
	head := 2 // packet id
	if v == 5 {
		head++ // empty properties
	}
	typ, body := c.read(t)
	if typ != packets.Suback || len(body) < head+len(order) {
		t.Fatalf("expected SUBACK, got type %d body %x", typ, body)
	}
	codes := body[head:]
	out := map[string]byte{}
	for i, f := range order {
		out[f] = codes[i]
	}
	return out
}

// TestPhoneSessionsV5: MQTT 5 phones through ServePhone: a bad token gets
// CONNACK 0x86; SUBACK grants the four per-device topics of a readable
// device at QoS ≤ 1 and refuses (0x87) other devices, other topics and
// wildcards; a publish gets DISCONNECT 0x87; a stored message reaches the
// phone; revocation and expiry end the session with DISCONNECT 0x87.
func TestPhoneSessionsV5(t *testing.T) {
	ok := &fakeSession{openid: "u1", exp: time.Now().Add(time.Hour), read: map[string]bool{"d1": true}}
	short := &fakeSession{openid: "u2", exp: time.Now().Add(1500 * time.Millisecond), read: map[string]bool{}}
	pub := &fakeSession{openid: "u3", exp: time.Now().Add(time.Hour), read: map[string]bool{}}
	rev := &fakeSession{openid: "u4", exp: time.Now().Add(time.Hour), read: map[string]bool{}}
	b := startBroker(t, Config{Phones: &fakePhones{sessions: map[string]*fakeSession{"ok": ok, "short": short, "pub": pub, "rev": rev}}}, nil)

	if _, code := phoneV5(t, b, "nope"); code != packets.ErrBadUsernameOrPassword.Code {
		t.Fatalf("bad token: CONNACK %#x, want 0x86", code)
	}
	c, code := phoneV5(t, b, "ok")
	if code != 0 {
		t.Fatalf("good token: CONNACK %#x", code)
	}
	got := c.subscribe(t, 1, map[string]byte{
		"sensors/d1/telemetry": 2, "sensors/d1/state": 0, "devices/d1/desired": 1, "alerts/d1": 1,
		"sensors/d2/telemetry": 1, "sensors/+/telemetry": 0, "#": 0, "devices/d1/other": 0, "alerts/d1/x": 0,
	})
	want := map[string]byte{
		"sensors/d1/telemetry": 1, "sensors/d1/state": 0, "devices/d1/desired": 1, "alerts/d1": 1,
		"sensors/d2/telemetry": 0x87, "sensors/+/telemetry": 0x87, "#": 0x87, "devices/d1/other": 0x87, "alerts/d1/x": 0x87,
	}
	for f, w := range want {
		if got[f] != w {
			t.Errorf("SUBACK %s = %#x, want %#x", f, got[f], w)
		}
	}
	b.Forward("sensors/d1/telemetry", []byte(`{"metrics":{"t":1}}`), 0, false)
	if typ, body := c.read(t); typ != packets.Publish || !bytes.Contains(body, []byte("sensors/d1/telemetry")) {
		t.Fatalf("expected the forwarded PUBLISH, got type %d %x", typ, body)
	}

	for _, tc := range []struct {
		name, token string
		end         func(*v5conn)
	}{
		{"publish", "pub", func(c *v5conn) {
			pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, ProtocolVersion: 5, TopicName: "sensors/d1/telemetry", Payload: []byte("{}")}
			var buf bytes.Buffer
			_ = pk.PublishEncode(&buf)
			go func() { _, _ = c.Write(buf.Bytes()) }()
		}},
		{"revoked", "rev", func(*v5conn) { rev.revoked.Store(true); b.RecheckPhones() }},
		{"expired", "short", func(*v5conn) {}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, code := phoneV5(t, b, tc.token)
			if code != 0 {
				t.Fatalf("CONNACK %#x", code)
			}
			tc.end(c)
			typ, body := c.read(t)
			if typ != packets.Disconnect || len(body) < 1 || body[0] != packets.ErrNotAuthorized.Code {
				t.Fatalf("expected DISCONNECT 0x87, got type %d %x", typ, body)
			}
		})
	}
}

// TestPhoneTopic: exactly the four per-device topics name a device.
func TestPhoneTopic(t *testing.T) {
	for filter, want := range map[string]string{
		"sensors/d1/telemetry":   "d1",
		"sensors/d1/state":       "d1",
		"devices/d1/desired":     "d1",
		"alerts/d1":              "d1",
		"sensors/d1/other":       "",
		"sensors/d1/telemetry/x": "",
		"sensors/telemetry":      "",
		"devices/d1/state":       "",
		"alerts/d1/x":            "",
		"alerts":                 "",
		"sensors/+/telemetry":    "",
		"alerts/#":               "",
		"other/d1/telemetry":     "",
	} {
		if got := phoneTopic(filter); got != want {
			t.Errorf("phoneTopic(%q) = %q, want %q", filter, got, want)
		}
	}
}

// settle returns once the broker is done with the session's last packet,
// which, for a SUBSCRIBE, ends after its SUBACK with the look-up of
// retained messages (see subscribe in fanout_test.go): the PINGRESP to a
// PINGREQ sent after it. Nothing may arrive before the PINGRESP.
func (c *v5conn) settle(t *testing.T) {
	t.Helper()
	go func() { _, _ = c.Write([]byte{packets.Pingreq << 4, 0}) }()
	if typ, body := c.read(t); typ != packets.Pingresp {
		t.Fatalf("expected a PINGRESP, got type %d %x", typ, body)
	}
}

// readPub reads an MQTT 5 PUBLISH: its topic and payload.
func (c *v5conn) readPub(t *testing.T) (string, string) {
	t.Helper()
	topic, body, _ := c.readPubAs(t, 5)
	return topic, body
}

// readPubAs reads a PUBLISH of a version-v session: topic, payload, QoS.
func (c *v5conn) readPubAs(t *testing.T, v byte) (string, string, byte) {
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

// TestPhoneLiveMirror: phones get sensors/ topics through the live mirror
// under the topic they subscribed to, ending on each topic's latest
// message, with a retained message kept for later phones (the rate itself:
// TestLiveFeedRate, TestFanoutLiveMirror); they cannot subscribe to the
// mirror itself; a TCP subscriber to # never sees it and a TCP client
// cannot publish into it; TCP subscribers get every message (unless
// routing conflates).
func TestPhoneLiveMirror(t *testing.T) {
	u := &fakeSession{openid: "u1", exp: time.Now().Add(time.Hour), read: map[string]bool{"d1": true}}
	u2 := &fakeSession{openid: "u2", exp: time.Now().Add(time.Hour), read: map[string]bool{"d1": true}}
	e := newEnv(t, Config{Phones: &fakePhones{sessions: map[string]*fakeSession{"ok": u, "late": u2}}, LiveInterval: 200 * time.Millisecond})
	b := e.b
	dash := subscribe(t, mustDial(t, b.Addr(), "dash", "", ""), "#", 0)
	c, _ := phoneV5(t, b, "ok")
	got := c.subscribe(t, 1, map[string]byte{"sensors/d1/telemetry": 0, "sensors/d1/state": 0, "$live/sensors/d1/telemetry": 0})
	if got["sensors/d1/telemetry"] != 0 || got["sensors/d1/state"] != 0 || got["$live/sensors/d1/telemetry"] != 0x87 {
		t.Fatalf("SUBACK %v, want sensors/ granted and $live/ refused (0x87)", got)
	}
	c.settle(t) // else s1 can come twice, live and retained

	b.Forward("sensors/d1/telemetry", []byte("t1"), 0, false)
	if topic, body := c.readPub(t); topic != "sensors/d1/telemetry" || body != "t1" {
		t.Fatalf("phone got %s %q, want sensors/d1/telemetry t1", topic, body)
	}
	// Within the interval: held, each replacing the last; the injected one
	// is refused (nobody but the edge publishes on the mirror).
	b.Forward("sensors/d1/telemetry", []byte("t2"), 0, false)
	b.Forward("sensors/d1/telemetry", []byte("t3"), 0, false)
	waitTok(t, mustDial(t, b.Addr(), "evil", "", "").Publish("$live/sensors/d1/telemetry", 0, false, "evil"), "publish on the mirror")
	b.Forward("sensors/d1/state", []byte("s1"), 0, true)
	// t2 goes out only if the interval had passed since t1 (a slow run).
	var tele []string
	state := ""
	for state == "" || len(tele) == 0 || tele[len(tele)-1] != "t3" {
		switch topic, body := c.readPub(t); {
		case topic == "sensors/d1/telemetry" && body != "evil":
			tele = append(tele, body)
		case topic == "sensors/d1/state" && state == "":
			state = body
		default:
			t.Fatalf("phone got %s %q after %v and state %q", topic, body, tele, state)
		}
	}
	if g := fmt.Sprint(tele); g != "[t3]" && g != "[t2 t3]" || state != "s1" {
		t.Fatalf("phone got telemetry %v and state %q, want the latest telemetry (t3) and s1", tele, state)
	}
	late, _ := phoneV5(t, b, "late")
	late.subscribe(t, 1, map[string]byte{"sensors/d1/state": 0})
	if topic, body := late.readPub(t); topic != "sensors/d1/state" || body != "s1" {
		t.Fatalf("late phone got %s %q, want the retained sensors/d1/state s1", topic, body)
	}

	b.Forward("sensors/end/telemetry", []byte("end"), 0, false) // dash's last message
	var dashGot []string
	for g := receive(t, dash, "dash"); ; g = receive(t, dash, "dash") {
		dashGot = append(dashGot, g.body)
		if g.body == "end" {
			break
		}
	}
	// t2 may be conflated away if routing took t2 and t3 in one round.
	if g := fmt.Sprint(dashGot); g != "[t1 t2 t3 s1 end]" && g != "[t1 t3 s1 end]" {
		t.Fatalf("TCP subscriber to # got %v, want every message once and nothing of the mirror", dashGot)
	}
}

// TestPhoneLiveLatencyMetrics: a live delivery to a phone is observed from
// its commit (the fan-out's forward) to the live mirror's publish
// (outpost_mqtt_live_hold_duration_seconds) and to its write to the phone
// (outpost_mqtt_live_delivery_duration_seconds); a retained message a
// later subscription brings is not a live delivery and is not observed.
func TestPhoneLiveLatencyMetrics(t *testing.T) {
	u := &fakeSession{openid: "u1", exp: time.Now().Add(time.Hour), read: map[string]bool{"d1": true}}
	reg := prometheus.NewRegistry()
	e := newEnv(t, Config{Phones: &fakePhones{sessions: map[string]*fakeSession{"ok": u}}, LiveInterval: time.Hour, Registerer: reg})
	count := func(name string) uint64 {
		t.Helper()
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == name {
				return mf.GetMetric()[0].GetHistogram().GetSampleCount()
			}
		}
		t.Fatalf("%s not registered", name)
		return 0
	}
	waitCount := func(name string, want uint64) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); count(name) != want; {
			if time.Now().After(deadline) {
				t.Fatalf("%s observed %d times, want %d", name, count(name), want)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	c, _ := phoneV5(t, e.b, "ok")
	c.subscribe(t, 1, map[string]byte{"sensors/d1/telemetry": 0})
	e.b.Forward("sensors/d1/state", []byte("s1"), 0, true) // retained, no phone on it yet
	waitCount("outpost_mqtt_live_hold_duration_seconds", 1)
	e.b.Forward("sensors/d1/telemetry", []byte("t1"), 0, false)
	if topic, body := c.readPub(t); topic != "sensors/d1/telemetry" || body != "t1" {
		t.Fatalf("phone got %s %q, want sensors/d1/telemetry t1", topic, body)
	}
	waitCount("outpost_mqtt_live_hold_duration_seconds", 2)
	waitCount("outpost_mqtt_live_delivery_duration_seconds", 1)
	c.subscribe(t, 2, map[string]byte{"sensors/d1/state": 0})
	if topic, body := c.readPub(t); topic != "sensors/d1/state" || body != "s1" {
		t.Fatalf("phone got %s %q, want the retained sensors/d1/state s1", topic, body)
	}
	// The retained message's write is done once the phone has read it;
	// a live delivery after it is the only one observed next.
	e.b.Forward("sensors/d1/state", []byte("s2"), 0, false)
	if topic, body := c.readPub(t); topic != "sensors/d1/state" || body != "s2" {
		t.Fatalf("phone got %s %q, want sensors/d1/state s2", topic, body)
	}
	waitCount("outpost_mqtt_live_delivery_duration_seconds", 2)
}
