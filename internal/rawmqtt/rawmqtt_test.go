package rawmqtt

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

	"github.com/outpost-edge/outpost/internal/daemontest"
)

// The publisher speaks MQTT 3.1.1 to a real broker: it connects, every
// QoS 1 message arrives with its topic and payload, and every PUBACK comes
// back to OnAck with the message's tag, after OnSend saw it, through more
// messages than the window holds (so packet ids are reused).
func TestPublisherAgainstMochi(t *testing.T) {
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
	var sentMu sync.Mutex
	sent := map[string]bool{}
	p, err := Dial(tcp.Address(), Options[string]{ClientID: "bench-pub", Window: 8,
		OnSend: func(tag string) {
			sentMu.Lock()
			sent[tag] = true
			sentMu.Unlock()
		},
		OnAck: func(tag string, d time.Duration) {
			if d <= 0 {
				t.Errorf("ack of %s after %s", tag, d)
			}
			sentMu.Lock()
			if !sent[tag] {
				t.Errorf("ack of %s, never passed to OnSend", tag)
			}
			sentMu.Unlock()
			acked[tag] = true // readLoop is the only caller
		}})
	if err != nil {
		t.Fatal(err)
	}
	for i := range n {
		if err := p.Publish("sensors/d1/telemetry", fmt.Sprint("m", i), fmt.Appendf(nil, `{"n":%d}`, i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Drain(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	p.Close()
	if len(acked) != n {
		t.Fatalf("%d of %d messages acknowledged", len(acked), n)
	}
	daemontest.Poll(t, 5*time.Second, "every message at the subscriber", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(got) == n
	})
	mu.Lock()
	defer mu.Unlock()
	for i := range n {
		if topic := got[fmt.Sprintf(`{"n":%d}`, i)]; topic != "sensors/d1/telemetry" {
			t.Fatalf("message %d arrived on %q (%d of %d arrived)", i, topic, len(got), n)
		}
	}
}
