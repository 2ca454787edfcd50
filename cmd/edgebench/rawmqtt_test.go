package main

import (
	"fmt"
	"io"
	"log/slog"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
)

// The raw publisher speaks MQTT 3.1.1 to a real broker: it connects, every
// QoS 1 message arrives with its topic and payload, and every PUBACK comes
// back to onAck with the message's tag, through more messages than the
// window holds (so packet ids are reused).
func TestRawPublisherAgainstMochi(t *testing.T) {
	srv := mqtt.New(&mqtt.Options{InlineClient: true, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err := srv.AddHook(new(auth.AllowHook), nil); err != nil {
		t.Fatal(err)
	}
	tcp := listeners.NewTCP(listeners.Config{ID: "t", Address: "127.0.0.1:0"})
	if err := srv.AddListener(tcp); err != nil {
		t.Fatal(err)
	}
	if err := srv.Serve(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })

	const n = 300
	var mu sync.Mutex
	got := map[string]string{} // payload → topic
	if err := srv.Subscribe("sensors/#", 1, func(_ *mqtt.Client, _ packets.Subscription, pk packets.Packet) {
		mu.Lock()
		got[string(pk.Payload)] = pk.TopicName
		mu.Unlock()
	}); err != nil {
		t.Fatal(err)
	}
	acked := map[string]bool{}
	p, err := dialRaw(tcp.Address(), "bench-pub", 8, func(tag string, d time.Duration) {
		if d <= 0 {
			t.Errorf("ack of %s after %s", tag, d)
		}
		acked[tag] = true // readLoop is the only caller
	})
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if err := p.publish("sensors/d1/telemetry", fmt.Sprint("m", i), fmt.Appendf(nil, `{"n":%d}`, i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.drain(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	p.close()
	if len(acked) != n {
		t.Fatalf("%d of %d messages acknowledged", len(acked), n)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		mu.Lock()
		k := len(got)
		mu.Unlock()
		if k == n || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	for i := range n {
		if topic := got[fmt.Sprintf(`{"n":%d}`, i)]; topic != "sensors/d1/telemetry" {
			t.Fatalf("message %d arrived on %q (%d of %d arrived)", i, topic, len(got), n)
		}
	}
}
