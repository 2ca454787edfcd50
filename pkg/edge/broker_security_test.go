package edge

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/outpost-edge/outpost/pkg/wire"
)

// TestSecurityEdgeRestoresDownlink: a retained downlink in the broker's
// state file that differs from the edge's desired state (here forged
// through the edge's own broker while it ran, as a client could on the old
// broker) is replaced by the store's at the next start, before devices can
// read it.
// Finding 11: anyone could forge or erase a retained downlink, and the edge
// never republished it.
func TestSecurityEdgeRestoresDownlink(t *testing.T) {
	cfg := testConfig(t)
	log, lv := quiet()
	e, err := Start(context.Background(), cfg, log, lv)
	if err != nil {
		t.Fatal(err)
	}
	d, err := e.st.SetDesired("d1", map[string]json.RawMessage{"valve": json.RawMessage(`"closed"`)})
	if err != nil {
		t.Fatal(err)
	}
	want, err := wire.DesiredPayload(d.Desired)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.brk.Publish(wire.DesiredTopic("d1"), []byte(`{"version":"99","state":{"valve":"open"}}`), true, 1); err != nil {
		t.Fatal(err)
	}
	if err := e.Shutdown(10 * time.Second); err != nil {
		t.Fatal(err)
	}

	cfg.MQTT.Listen = "127.0.0.1:0"
	e, err = Start(context.Background(), cfg, log, lv)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Shutdown(10 * time.Second)
	got := make(chan string, 1)
	c := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + e.MQTTAddr()).SetClientID("d1").SetAutoReconnect(false))
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connect: %v", tok.Error())
	}
	defer c.Disconnect(50)
	tok := c.Subscribe(wire.DesiredTopic("d1"), 1, func(_ paho.Client, m paho.Message) {
		select {
		case got <- string(m.Payload()):
		default:
		}
	})
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("subscribe: %v", tok.Error())
	}
	select {
	case p := <-got:
		if p != string(want) {
			t.Fatalf("retained downlink after restart = %s, want the edge's %s", p, want)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no retained downlink after restart")
	}
}

// TestBrokerConfigValidated: the broker's limits are checked by key.
func TestBrokerConfigValidated(t *testing.T) {
	c := DefaultConfig()
	c.MQTT.ConnectTimeout, c.MQTT.MaxConnections = 0, 0
	err := c.Validate()
	if err == nil {
		t.Fatal("Validate accepted a zero connect timeout and connection cap")
	}
	for _, key := range []string{"mqtt.connect_timeout", "mqtt.max_connections"} {
		if !strings.Contains(err.Error(), key+":") {
			t.Errorf("Validate = %v, want a problem under %s", err, key)
		}
	}
	d := DefaultConfig()
	if d.MQTT.AllowAnonymous || d.MQTT.ConnectTimeout != 5*time.Second || d.MQTT.MaxConnections != 4096 {
		t.Fatalf("broker defaults: %+v", d.MQTT)
	}
}
