package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// TestSyncRulesAndAlerts: a rule PUT at the cloud before the edge ever ran
// reaches it (source "cloud"); with the cloud unreachable, a reading raises
// the alert at the edge and the rule's set_desired action reaches the
// device over MQTT; once the link returns the alert reaches the cloud's
// GET /api/v1/alerts with its edge; an ack at the cloud converges at the
// edge (acknowledged, by the cloud's acker). The rule's desired write,
// made with the cloud's authority, is kept at the cloud. An edge restarted
// offline runs the cloud's rule from its cache.
func TestSyncRulesAndAlerts(t *testing.T) {
	c := startCloudCluster(t, 1)
	rule := map[string]any{"when": "temp > 30", "clear": "temp < 28", "message": "too warm",
		"actions": []any{map[string]any{"set_desired": map[string]any{"fan": "max"}}}}
	if code, env, err := c.api(c.Nodes[0], http.MethodPut, "/api/v1/rules/warm", rule); err != nil || code != 200 {
		t.Fatalf("put rule at the cloud: %d %s %v", code, env.Message, err)
	}
	link := newSyncLink(t, c)
	e := startSyncEdge(t, "e5", link)
	tok := e.login()
	type ruleInfo struct{ Name, Source string }
	cloudWaitFor(t, 20*time.Second, "the cloud's rule in force at the edge", func() bool {
		var page struct{ Items []ruleInfo }
		err := e.api(http.MethodGet, "/api/v1/rules", tok, nil, &page)
		return err == nil && len(page.Items) == 1 && page.Items[0].Name == "warm" && page.Items[0].Source == "cloud"
	})

	dev := "fr-1"
	mq := edgeConnect(t, e.MQTT, dev)
	desired := make(chan []byte, 16)
	if tk := mq.Subscribe("devices/"+dev+"/desired", 1, func(_ paho.Client, m paho.Message) { desired <- m.Payload() }); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("subscribe: %v", tk.Error())
	}
	link.cut(true)
	p := fmt.Appendf(nil, `{"ts":%d,"metrics":{"temp":%g}}`, time.Now().UnixMilli(), 33.0)
	if tk := mq.Publish("sensors/"+dev+"/telemetry", 1, false, p); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("publish: %v", tk.Error())
	}
	deadline := time.After(15 * time.Second)
	for got := false; !got; {
		select {
		case m := <-desired:
			var d struct {
				State map[string]any `json:"state"`
			}
			got = json.Unmarshal(m, &d) == nil && d.State["fan"] == "max"
		case <-deadline:
			t.Fatal("the rule's set_desired did not reach the device while the cloud was down")
		}
	}
	type alert struct {
		ID, State, Edge string
		AckedBy         string `json:"acked_by"`
	}
	var id string
	cloudWaitFor(t, 15*time.Second, "the alert at the edge while offline", func() bool {
		var page struct{ Items []alert }
		if err := e.api(http.MethodGet, "/api/v1/alerts?device="+dev, tok, nil, &page); err != nil || len(page.Items) != 1 {
			return false
		}
		id = page.Items[0].ID
		return page.Items[0].State == "active"
	})

	link.cut(false)
	cloudWaitFor(t, 30*time.Second, "the alert at the cloud after the link returned", func() bool {
		code, env, err := c.api(c.Nodes[0], http.MethodGet, "/api/v1/alerts?edge=e5&state=active", nil)
		var page struct{ Items []alert }
		if err != nil || code != 200 || json.Unmarshal(env.Data, &page) != nil || len(page.Items) != 1 {
			return false
		}
		return page.Items[0].ID == id && page.Items[0].Edge == "e5"
	})
	// The distributed rule's set_desired carries the cloud's authority: the
	// cloud keeps it (an unproven write would be corrected back).
	cloudWaitFor(t, 20*time.Second, "the rule's desired write at the cloud", func() bool {
		d, err := c.deviceState(c.Nodes[0], dev)
		return err == nil && string(d.Desired["fan"]) == `"max"`
	})
	if code, env, err := c.api(c.Nodes[0], http.MethodPost, "/api/v1/alerts/"+id+"/ack", map[string]string{"by": "o-ops"}); err != nil || code != 200 {
		t.Fatalf("ack at the cloud: %d %s %v", code, env.Message, err)
	}
	cloudWaitFor(t, 20*time.Second, "the cloud's ack at the edge", func() bool {
		var page struct{ Items []alert }
		err := e.api(http.MethodGet, "/api/v1/alerts?device="+dev, tok, nil, &page)
		return err == nil && len(page.Items) == 1 && page.Items[0].State == "acknowledged" && page.Items[0].AckedBy == "o-ops"
	})

	// Restarted with the cloud unreachable, the edge runs the cloud's rule
	// it cached.
	link.cut(true)
	e.kill9()
	e.start()
	var page struct{ Items []ruleInfo }
	if err := e.api(http.MethodGet, "/api/v1/rules", e.login(), nil, &page); err != nil || len(page.Items) != 1 || page.Items[0].Source != "cloud" {
		t.Fatalf("rules after an offline restart %+v: %v", page.Items, err)
	}
}
