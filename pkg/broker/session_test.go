package broker

import (
	"path/filepath"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// TestSessionSurvivesRestart: a device's persistent session (its
// subscription) and a QoS 1 message queued for it while it was offline are
// in the broker's state file, so a broker restart loses neither.
func TestSessionSurvivesRestart(t *testing.T) {
	statePath := filepath.Join(t.TempDir(), "broker.db")
	b1 := startBroker(t, Config{StatePath: statePath}, nil)

	got := make(chan paho.Message, 4)
	persistent := func(addr string) paho.Client {
		opts := paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID("d7").
			SetCleanSession(false).SetAutoReconnect(false).SetConnectTimeout(5 * time.Second).
			SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { got <- m })
		c := paho.NewClient(opts)
		waitTok(t, c.Connect(), "connect d7")
		return c
	}
	c := persistent(b1.Addr())
	waitTok(t, c.Subscribe("devices/d7/cmd", 1, nil), "subscribe")
	c.Disconnect(50)

	// Offline: the broker queues a QoS 1 (not retained) downlink for d7.
	if err := b1.Publish("devices/d7/cmd", []byte(`{"reboot":true}`), false, 1); err != nil {
		t.Fatal(err)
	}
	if err := b1.Close(); err != nil {
		t.Fatal(err)
	}

	b2 := startBroker(t, Config{StatePath: statePath}, nil)
	c = persistent(b2.Addr()) // no new SUBSCRIBE: the session must carry it
	t.Cleanup(func() { c.Disconnect(50) })
	select {
	case m := <-got:
		if m.Topic() != "devices/d7/cmd" || string(m.Payload()) != `{"reboot":true}` {
			t.Fatalf("received %s %s", m.Topic(), m.Payload())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("queued QoS 1 message lost across a broker restart")
	}
	// The restored subscription still routes new messages.
	if err := b2.Publish("devices/d7/cmd", []byte(`{"n":2}`), false, 1); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-got:
		if string(m.Payload()) != `{"n":2}` {
			t.Fatalf("received %s", m.Payload())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("subscription lost across a broker restart")
	}
}
