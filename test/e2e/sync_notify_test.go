package e2e

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"
)

// wechatNotifyFake is WeChat's server API as cloud-sync calls it: client-credential
// tokens and subscribe messages. The first send is answered "system busy"
// (the cloud must retry); the others are counted by recipient.
type wechatNotifyFake struct {
	mu     sync.Mutex
	tokens int
	busy   bool
	sent   map[string]int
}

func startWeChatNotifyFake(t *testing.T) (*wechatNotifyFake, string) {
	t.Helper()
	f := &wechatNotifyFake{sent: map[string]int{}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		f.mu.Lock()
		defer f.mu.Unlock()
		switch r.URL.Path {
		case "/cgi-bin/token":
			f.tokens++
			_ = json.NewEncoder(w).Encode(map[string]any{"access_token": fmt.Sprintf("tok-%d", f.tokens), "expires_in": 7200})
		case "/cgi-bin/message/subscribe/send":
			var m struct {
				ToUser     string `json:"touser"`
				TemplateID string `json:"template_id"`
			}
			_ = json.NewDecoder(r.Body).Decode(&m)
			if !f.busy {
				f.busy = true
				_ = json.NewEncoder(w).Encode(map[string]any{"errcode": -1, "errmsg": "system busy"})
				return
			}
			f.sent[m.ToUser+"/"+m.TemplateID]++
			_ = json.NewEncoder(w).Encode(map[string]any{"errcode": 0, "errmsg": "ok"})
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(srv.Close)
	return f, srv.URL
}

func (f *wechatNotifyFake) count(key string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.sent[key]
}

// TestSyncAlertNotifiedOnce: a rule with a notify action raises an alert
// while the edge cannot reach the cloud; after the link returns the cloud
// sends the device's owner one WeChat subscribe message (retrying a busy
// answer), and later transitions of the alert (an ack at the edge, which
// reaches the cloud too) send nothing more.
func TestSyncAlertNotifiedOnce(t *testing.T) {
	wx, wxURL := startWeChatNotifyFake(t)
	c := startCloudCluster(t, 1, cloudWithArgs("-wechat-appid", "wx-e2e", "-wechat-secret", "e2e-wechat-secret-9f3b2a7c1d",
		"-wechat-api-base", wxURL, "-wechat-subscribe-template", "tpl-alert"))
	dev := "nt-1"
	if code, env, err := c.api(c.Nodes[0], http.MethodPut, "/api/v1/devices/"+dev+"/meta", map[string]any{"owners": []string{"o-owner"}}); err != nil || code != 200 {
		t.Fatalf("owners at the cloud: %d %s %v", code, env.Message, err)
	}
	rule := map[string]any{"when": "temp > 30", "message": "too warm", "actions": []any{map[string]any{"notify": true}}}
	if code, env, err := c.api(c.Nodes[0], http.MethodPut, "/api/v1/rules/warm", rule); err != nil || code != 200 {
		t.Fatalf("put rule: %d %s %v", code, env.Message, err)
	}
	link := newSyncLink(t, c)
	e := startSyncEdge(t, "e6", link)
	tok := e.login()
	cloudWaitFor(t, 20*time.Second, "the cloud's rule in force at the edge", func() bool {
		var page struct{ Items []struct{ Name string } }
		return e.api(http.MethodGet, "/api/v1/rules", tok, nil, &page) == nil && len(page.Items) == 1
	})
	mq := edgeConnect(t, e.MQTT, dev)
	link.cut(true)
	p := fmt.Appendf(nil, `{"ts":%d,"metrics":{"temp":%g}}`, time.Now().UnixMilli(), 35.0)
	if tk := mq.Publish("sensors/"+dev+"/telemetry", 1, false, p); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("publish: %v", tk.Error())
	}
	var id string
	cloudWaitFor(t, 15*time.Second, "the alert at the edge while offline", func() bool {
		var page struct{ Items []struct{ ID string } }
		if e.api(http.MethodGet, "/api/v1/alerts?device="+dev, tok, nil, &page) != nil || len(page.Items) != 1 {
			return false
		}
		id = page.Items[0].ID
		return true
	})
	if n := wx.count("o-owner/tpl-alert"); n != 0 {
		t.Fatalf("%d notifications while the cloud could not know", n)
	}
	link.cut(false)
	cloudWaitFor(t, 30*time.Second, "one notification after the link returned", func() bool { return wx.count("o-owner/tpl-alert") == 1 })

	// A later transition reaches the cloud and notifies no one again.
	if err := e.api(http.MethodPost, "/api/v1/alerts/"+id+"/ack", tok, nil, nil); err != nil {
		t.Fatal(err)
	}
	cloudWaitFor(t, 20*time.Second, "the edge's ack at the cloud", func() bool {
		code, env, err := c.api(c.Nodes[0], http.MethodGet, "/api/v1/alerts?device="+dev, nil)
		var page struct{ Items []struct{ State string } }
		return err == nil && code == 200 && json.Unmarshal(env.Data, &page) == nil && len(page.Items) == 1 && page.Items[0].State == "acknowledged"
	})
	cloudWaitFor(t, 10*time.Second, "the cloud's notification queue empty", func() bool {
		v, ok := c.labelled(c.Nodes[0], `outpost_cloud_notifications_total{result="sent"}`)
		return ok && v == 1
	})
	if n := wx.count("o-owner/tpl-alert"); n != 1 {
		t.Fatalf("%d notifications, want exactly 1", n)
	}
}
