package e2e

import (
	"fmt"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// TestEdgeLiveFeed: against the real edge binary, a phone (MQTT 3.1.1 over
// WebSocket at /mqtt, password = access token, as the mini-program SDK
// connects) receives a reading a device publishes over TCP once it is
// stored; a wildcard is refused; and SIGTERM with the phone connected still
// stops the edge cleanly (exit 0), closing the phone's connection.
func TestEdgeLiveFeed(t *testing.T) {
	e := startEdge(t)
	tok := e.login()
	lost := make(chan error, 1)
	msgs := make(chan string, 16)
	p := paho.NewClient(paho.NewClientOptions().AddBroker("ws://" + e.HTTP + "/mqtt").
		SetClientID("phone").SetUsername("admin").SetPassword(tok).SetProtocolVersion(4).
		SetAutoReconnect(false).SetConnectRetry(false).SetConnectTimeout(5 * time.Second).
		SetConnectionLostHandler(func(_ paho.Client, err error) { lost <- err }))
	if ct := p.Connect(); !ct.WaitTimeout(10*time.Second) || ct.Error() != nil {
		t.Fatalf("phone connect: %v", ct.Error())
	}
	st := p.SubscribeMultiple(map[string]byte{"sensors/live-1/telemetry": 1}, func(_ paho.Client, m paho.Message) { msgs <- string(m.Payload()) })
	if !st.WaitTimeout(10*time.Second) || st.Error() != nil || st.(*paho.SubscribeToken).Result()["sensors/live-1/telemetry"] != 1 {
		t.Fatalf("subscribe: %v %v", st.Error(), st.(*paho.SubscribeToken).Result())
	}
	wt := p.Subscribe("sensors/#", 0, nil)
	if !wt.WaitTimeout(10*time.Second) || wt.(*paho.SubscribeToken).Result()["sensors/#"] != 0x80 {
		t.Fatalf("wildcard subscribe: %v", wt.(*paho.SubscribeToken).Result())
	}

	dev := edgeConnect(t, e.MQTT, "live-1")
	body := fmt.Sprintf(`{"ts": %d, "id": "m1", "metrics": {"temp": 20}}`, time.Now().UnixMilli())
	if pt := dev.Publish("sensors/live-1/telemetry", 1, false, body); !pt.WaitTimeout(10*time.Second) || pt.Error() != nil {
		t.Fatalf("device publish: %v", pt.Error())
	}
	select {
	case m := <-msgs:
		if m != body {
			t.Fatalf("phone got %s, want %s", m, body)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("phone received nothing within 10s")
	}

	if err := e.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-e.exited:
	case <-time.After(30 * time.Second):
		t.Fatal("edge still running 30s after SIGTERM with a phone connected")
	}
	if code := e.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("edge exit code %d after SIGTERM, want 0", code)
	}
	select {
	case <-lost:
	case <-time.After(10 * time.Second):
		t.Fatal("the phone's connection survived the edge")
	}
}
