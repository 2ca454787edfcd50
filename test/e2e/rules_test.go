package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// TestRulesAtTheEdge: the edge binary with no cloud at all. An admin puts
// a rule through the API; a device's committed reading raises an alert,
// which the device receives on alerts/{device}, the rule's set_desired
// action reaches the device as its desired-state downlink, and the alert
// is listed, acked, and cleared by a later reading. After kill -9 and a
// restart the rule is still in force.
func TestRulesAtTheEdge(t *testing.T) {
	e := startEdge(t)
	tok := e.login()
	rule := map[string]any{"when": "temp > 30", "clear": "temp < 28", "message": "freezer too warm",
		"actions": []any{map[string]any{"set_desired": map[string]any{"compressor": "boost"}}}}
	if err := e.api(http.MethodPut, "/api/v1/rules/warm", tok, rule, nil); err != nil {
		t.Fatal(err)
	}
	dev := "freezer-1"
	c := edgeConnect(t, e.MQTT, dev)
	alerts := make(chan []byte, 16)
	desired := make(chan []byte, 16)
	for topic, ch := range map[string]chan []byte{"alerts/" + dev: alerts, "devices/" + dev + "/desired": desired} {
		ch := ch
		if tk := c.Subscribe(topic, 1, func(_ paho.Client, m paho.Message) { ch <- m.Payload() }); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
			t.Fatalf("subscribe %s: %v", topic, tk.Error())
		}
	}
	publish := func(temp float64) {
		t.Helper()
		p := fmt.Appendf(nil, `{"ts":%d,"metrics":{"temp":%g}}`, time.Now().UnixMilli(), temp)
		if tk := c.Publish("sensors/"+dev+"/telemetry", 1, false, p); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
			t.Fatalf("publish: %v", tk.Error())
		}
	}
	type alert struct {
		ID      string  `json:"id"`
		State   string  `json:"state"`
		Message string  `json:"message"`
		AckedBy string  `json:"acked_by"`
		Value   float64 `json:"value"`
	}
	next := func(ch chan []byte, what string) []byte {
		t.Helper()
		select {
		case p := <-ch:
			return p
		case <-time.After(15 * time.Second):
			t.Fatalf("no %s", what)
			return nil
		}
	}
	publish(20)
	publish(33)
	var a alert
	if err := json.Unmarshal(next(alerts, "alert on alerts/"+dev), &a); err != nil || a.State != "active" || a.Value != 33 || a.Message != "freezer too warm" {
		t.Fatalf("alert %+v: %v", a, err)
	}
	var d struct {
		State map[string]any `json:"state"`
	}
	if p := next(desired, "desired downlink"); json.Unmarshal(p, &d) != nil || d.State["compressor"] != "boost" {
		t.Fatalf("desired downlink %s", p)
	}
	var page struct{ Items []alert }
	if err := e.api(http.MethodGet, "/api/v1/alerts?state=active&device="+dev, tok, nil, &page); err != nil || len(page.Items) != 1 {
		t.Fatalf("active alerts %+v: %v", page.Items, err)
	}
	if err := e.api(http.MethodPost, "/api/v1/alerts/"+a.ID+"/ack", tok, nil, nil); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(next(alerts, "the ack on alerts/"+dev), &a); err != nil || a.State != "acknowledged" {
		t.Fatalf("after ack %+v: %v", a, err)
	}
	publish(25)
	if err := json.Unmarshal(next(alerts, "the clear on alerts/"+dev), &a); err != nil || a.State != "cleared" || a.AckedBy != "admin" {
		t.Fatalf("after clear %+v: %v", a, err)
	}

	e.kill9()
	e.start()
	var rules struct {
		Items []struct{ Name, Source string }
	}
	if err := e.api(http.MethodGet, "/api/v1/rules", e.login(), nil, &rules); err != nil || len(rules.Items) != 1 || rules.Items[0].Name != "warm" {
		t.Fatalf("rules after a restart %+v: %v", rules.Items, err)
	}
}
