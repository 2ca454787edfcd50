package ingest

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/outpost-edge/outpost/pkg/store"
)

// runSubscriber starts a subscriber and returns a function that stops it
// and waits for Run to return.
func runSubscriber(t *testing.T, cfg SubscriberConfig, w *Writer) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s := NewSubscriber(cfg, w)
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("subscriber Run: %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Error("subscriber did not stop within 10s")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

func dialBroker(t *testing.T, addr, id string) paho.Client {
	t.Helper()
	c := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(id).
		SetCleanSession(true).SetAutoReconnect(false).SetConnectTimeout(5 * time.Second))
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connect %s: %v", id, tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(50) })
	return c
}

// publishN publishes messages [from, to) for each of devs from its own
// client, QoS 1, and waits for every PUBACK from the broker.
func publishN(t *testing.T, addr string, devs []string, from, to int) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, len(devs))
	for _, dev := range devs {
		c := dialBroker(t, addr, fmt.Sprintf("pub-%s-%d", dev, from))
		wg.Add(1)
		go func() {
			defer wg.Done()
			var toks []paho.Token
			for i := from; i < to; i++ {
				toks = append(toks, c.Publish("sensors/"+dev+"/telemetry", 1, false,
					fmt.Sprintf(`{"ts": %d, "id": "m%d", "metrics": {"v": %d}}`, 1732170000000+int64(i), i, i)))
			}
			for i, tok := range toks {
				if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
					errs <- fmt.Errorf("%s message %d: no PUBACK: %v", dev, from+i, tok.Error())
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// waitStored polls until each device has readings m0..m{n-1} and checks
// that each is stored exactly once.
func waitStored(t *testing.T, st *store.Store, devs []string, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for _, dev := range devs {
		for {
			ids := map[string]int{}
			p, err := st.Readings(dev, store.ReadingsQuery{Limit: 100000})
			if err != nil && err != store.ErrNotFound {
				t.Fatal(err)
			}
			for _, r := range p.Items {
				ids[r.ID]++
			}
			for id, c := range ids {
				if c != 1 {
					t.Fatalf("%s: %s stored %d times", dev, id, c)
				}
			}
			complete := len(ids) == n
			for i := 0; complete && i < n; i++ {
				complete = ids[fmt.Sprintf("m%d", i)] == 1
			}
			if complete {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d of %d readings stored after 20s", dev, len(ids), n)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

func TestSubscriberMosquitto(t *testing.T) {
	addr := startMosquitto(t)
	st := openStore(t)
	w := NewWriter(st, NewDecoder(DefaultLimits), Config{Linger: time.Millisecond}, nil, discardLogger())
	startWriter(t, w)
	cfg := SubscriberConfig{BrokerURL: "tcp://" + addr, ClientID: "edge-ingest", Logger: discardLogger()}
	stop := runSubscriber(t, cfg, w)

	// Wait for the subscription: probes are stored once it is in place.
	probe := dialBroker(t, addr, "probe")
	deadline := time.Now().Add(20 * time.Second)
	for i := 0; ; i++ {
		probe.Publish("sensors/probe/telemetry", 1, false, fmt.Sprintf(`{"id":"p%d","metrics":{"v":1}}`, i)).Wait()
		if _, err := st.Device("probe"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("subscriber never subscribed")
		}
		time.Sleep(20 * time.Millisecond)
	}

	devs := []string{"d1", "d2", "d3"}
	const n1, n2 = 150, 250
	publishN(t, addr, devs, 0, n1)
	waitStored(t, st, devs, n1)

	// Offline: the persistent session queues what is published meanwhile.
	stop()
	publishN(t, addr, devs, n1, n2)
	runSubscriber(t, cfg, w)
	waitStored(t, st, devs, n2)
	// The in-memory counters follow the commit that made the readings
	// visible, so poll rather than read once.
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		c := st.Counts()
		if c.Readings >= uint64(len(devs)*n2) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("counts %+v, want at least %d readings", c, len(devs)*n2)
		}
	}
}

// TestDownlinkStoreKeepsNoOutboundPublish: the subscriber's session store
// keeps no outbound publish (paho's resume would race the republish of
// every downlink that follows a connect, see downlinkStore), and keeps
// everything else.
func TestDownlinkStoreKeepsNoOutboundPublish(t *testing.T) {
	s := newDownlinkStore()
	s.Open()
	defer s.Close()
	pub := packets.NewControlPacket(packets.Publish).(*packets.PublishPacket)
	pub.MessageID = 7
	s.Put("o.7", pub)
	in := packets.NewControlPacket(packets.Publish).(*packets.PublishPacket)
	in.MessageID = 8
	s.Put("i.8", in)
	rel := packets.NewControlPacket(packets.Pubrel).(*packets.PubrelPacket)
	rel.MessageID = 9
	s.Put("o.9", rel)
	if s.Get("o.7") != nil {
		t.Fatal("an outbound publish was kept")
	}
	if s.Get("i.8") == nil || s.Get("o.9") == nil {
		t.Fatalf("kept %v: want the inbound publish and the pubrel", s.All())
	}
}
