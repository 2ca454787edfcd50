package ingest

import (
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// downlinkMap is the edge's desired state, as a map.
type downlinkMap struct {
	mu sync.Mutex
	m  map[string][]byte
}

func (d *downlinkMap) Desired(dev string) ([]byte, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.m[dev], nil
}

func (d *downlinkMap) EachDesired(fn func(string, []byte) bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	for dev, p := range d.m {
		if !fn(dev, p) {
			break
		}
	}
	return nil
}

// retained returns topic's retained payload on the broker ("" if none
// arrives within a moment).
func retained(t *testing.T, addr, topic string) string {
	t.Helper()
	got := make(chan string, 1)
	c := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID("check").
		SetCleanSession(true).SetAutoReconnect(false).SetConnectTimeout(5 * time.Second))
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connect: %v", tok.Error())
	}
	defer c.Disconnect(0)
	tok := c.Subscribe(topic, 1, func(_ paho.Client, m paho.Message) {
		if m.Retained() {
			select {
			case got <- string(m.Payload()):
			default:
			}
		}
	})
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe %s: %v", topic, tok.Error())
	}
	select {
	case p := <-got:
		return p
	case <-time.After(300 * time.Millisecond):
		return ""
	}
}

func waitRetained(t *testing.T, addr, topic, want, what string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		got := retained(t, addr, topic)
		if got == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s retained %q, want %q", what, topic, got, want)
		}
	}
}

// TestSecurityExternalDownlinkRestore: with an external broker, whose ACL
// the edge does not control, a retained downlink forged or erased by
// another client is republished from the edge's desired state, at connect
// and at run time; topics of devices the edge does not know are left
// alone.
// Finding 11: anyone could forge or erase a retained downlink, and the edge
// never republished it.
func TestSecurityExternalDownlinkRestore(t *testing.T) {
	addr := startMosquitto(t)
	st := openStore(t)
	w := NewWriter(st, NewDecoder(DefaultLimits), Config{}, nil, discardLogger())
	startWriter(t, w)
	const topic, good = "devices/d1/desired", `{"version":"5","state":{"valve":"closed"}}`
	const forged = `{"version":"99","state":{"valve":"open"}}`

	attacker := dialBroker(t, addr, "attacker")
	publish := func(topic, payload string) {
		t.Helper()
		if tok := attacker.Publish(topic, 1, true, payload); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
			t.Fatalf("attacker publish: %v", tok.Error())
		}
	}
	publish(topic, forged)
	publish("devices/other/desired", forged) // another edge's device, perhaps

	src := &downlinkMap{m: map[string][]byte{"d1": []byte(good)}}
	runSubscriber(t, SubscriberConfig{BrokerURL: "tcp://" + addr, ClientID: "edge-1", Downlinks: src, Logger: discardLogger()}, w)
	waitRetained(t, addr, topic, good, "forged before the edge connected")

	publish(topic, forged)
	waitRetained(t, addr, topic, good, "forged while the edge is connected")
	publish(topic, "")
	waitRetained(t, addr, topic, good, "erased while the edge is connected")
	if got := retained(t, addr, "devices/other/desired"); got != forged {
		t.Fatalf("a downlink of a device the edge does not know was changed: %q", got)
	}
}
