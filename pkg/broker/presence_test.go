package broker

import (
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// waitOnline polls b.Online(dev) until it is want.
func waitOnline(t *testing.T, b *Broker, dev string, want bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); b.Online(dev) != want; {
		if time.Now().After(deadline) {
			t.Fatalf("Online(%q) stayed %v", dev, !want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// rawConnect opens a TCP connection and sends an MQTT 3.1.1 CONNECT for
// clientID with a Will on willTopic, and reads the CONNACK.
func rawConnect(t *testing.T, addr, clientID, willTopic string) net.Conn {
	t.Helper()
	str := func(s string) []byte { return append(binary.BigEndian.AppendUint16(nil, uint16(len(s))), s...) }
	body := append(str("MQTT"), 4, 0x02|0x04, 0, 60) // clean session, will (QoS 0), keepalive 60 s
	body = append(body, str(clientID)...)
	body = append(body, str(willTopic)...)
	body = append(body, str(`{"gone":true}`)...)
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if _, err := conn.Write(append([]byte{0x10, byte(len(body))}, body...)); err != nil {
		t.Fatal(err)
	}
	ack := make([]byte, 4)
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(conn, ack); err != nil || ack[0] != 0x20 || ack[3] != 0 {
		t.Fatalf("CONNACK %x: %v", ack, err)
	}
	return conn
}

// TestPresence: a device is online from its connection's establishment to
// its end, whether it disconnects cleanly or drops (its Will sent); two
// connections of one device keep it online until both end; the edge's own
// publishes and refused logins count for nobody.
func TestPresence(t *testing.T) {
	b := startBroker(t, Config{}, nil)
	if b.Online("d1") {
		t.Fatal("d1 online before connecting")
	}

	// A clean connect and DISCONNECT.
	opts := paho.NewClientOptions().AddBroker("tcp://" + b.Addr()).SetClientID("d1").
		SetAutoReconnect(false).SetConnectTimeout(5 * time.Second)
	c := paho.NewClient(opts)
	waitTok(t, c.Connect(), "connect d1")
	waitOnline(t, b, "d1", true)
	c.Disconnect(50)
	waitOnline(t, b, "d1", false)

	// A dropped connection: the Will goes and so does the presence.
	will := make(chan struct{}, 1)
	watch := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + b.Addr()).SetClientID("watcher").
		SetAutoReconnect(false).SetConnectTimeout(5 * time.Second))
	waitTok(t, watch.Connect(), "connect watcher")
	t.Cleanup(func() { watch.Disconnect(50) })
	waitTok(t, watch.Subscribe("sensors/d2/status", 0, func(paho.Client, paho.Message) { will <- struct{}{} }), "subscribe")
	conn := rawConnect(t, b.Addr(), "d2", "sensors/d2/status")
	waitOnline(t, b, "d2", true)
	conn.Close()
	waitOnline(t, b, "d2", false)
	select {
	case <-will:
	case <-time.After(10 * time.Second):
		t.Fatal("the dropped client's Will was not sent")
	}

	// Two connections of one device ("d3:a", "d3:b").
	a := rawConnect(t, b.Addr(), "d3:a", "sensors/d3/status")
	bb := rawConnect(t, b.Addr(), "d3:b", "sensors/d3/status")
	waitOnline(t, b, "d3", true)
	a.Close()
	// b is still connected: wait until the broker has seen a go (its
	// session is gone), then check d3 is still online.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if _, ok := b.srv.Clients.Get("d3:a"); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("d3:a never went")
		}
	}
	if !b.Online("d3") {
		t.Fatal("d3 offline while d3:b is connected")
	}
	bb.Close()
	waitOnline(t, b, "d3", false)

	// The edge's own publishes (the inline client) are nobody.
	if err := b.Publish("devices/d4/desired", []byte(`{}`), false, 0); err != nil {
		t.Fatal(err)
	}
	if b.Online("") || b.Online("d4") {
		t.Fatal("the inline client counted as a device")
	}
}

// TestPresenceWithCredentials: with device credentials a device is its
// username (its client id may carry a ":suffix"); a service user is no
// device, and a refused login makes nobody online.
func TestPresenceWithCredentials(t *testing.T) {
	b := startBroker(t, Config{
		Credentials:  map[string]string{"d1": hash(t, "pw1")},
		ServiceUsers: map[string]string{"svc": hash(t, "svc")},
	}, nil)
	connect := func(id, user, pw string) (paho.Client, error) {
		c := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + b.Addr()).SetClientID(id).
			SetUsername(user).SetPassword(pw).SetAutoReconnect(false).SetConnectTimeout(5 * time.Second))
		tok := c.Connect()
		if !tok.WaitTimeout(10 * time.Second) {
			t.Fatalf("connect %s: no answer", id)
		}
		return c, tok.Error()
	}
	if _, err := connect("d1", "d1", "wrong"); err == nil {
		t.Fatal("a wrong password connected")
	}
	if b.Online("d1") {
		t.Fatal("a refused login made d1 online")
	}
	svc, err := connect("monitor", "svc", "svc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Disconnect(50) })
	d1, err := connect("d1:phone", "d1", "pw1")
	if err != nil {
		t.Fatal(err)
	}
	waitOnline(t, b, "d1", true)
	if b.Online("svc") || b.Online("monitor") {
		t.Fatal("a service user counted as a device")
	}
	d1.Disconnect(50)
	waitOnline(t, b, "d1", false)
}
