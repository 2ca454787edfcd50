package edge

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/outpost-edge/outpost/internal/benchproc"
	"github.com/outpost-edge/outpost/internal/daemontest"
)

// liveEdge is a started, serving standalone edge with dev login and admin
// "root".
func liveEdge(t *testing.T, mod func(*Config)) *Edge {
	t.Helper()
	cfg := testConfig(t)
	cfg.DevLogin, cfg.Admins = true, []string{"root"}
	if mod != nil {
		mod(&cfg)
	}
	log, lv := quiet()
	ctx, cancel := context.WithCancel(context.Background())
	e, err := Start(ctx, cfg, log, lv)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = e.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done; _ = e.Shutdown(10 * time.Second) })
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get("http://" + e.HTTPAddr() + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return e
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("/healthz not answering 200 within 10s: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func call(t *testing.T, e *Edge, method, path, token string, body any) int {
	t.Helper()
	var rd bytes.Buffer
	if body != nil {
		_ = json.NewEncoder(&rd).Encode(body)
	}
	req, _ := http.NewRequest(method, "http://"+e.HTTPAddr()+path, &rd)
	req.Header.Set("Content-Type", "application/json")
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	return resp.StatusCode
}

func devLogin(t *testing.T, e *Edge, openid string) string {
	t.Helper()
	resp, err := http.Post("http://"+e.HTTPAddr()+"/api/v1/auth/login", "application/json",
		bytes.NewReader([]byte(`{"code":"dev:`+openid+`"}`)))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var env struct {
		Data struct {
			AccessToken string `json:"access_token"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&env); err != nil || env.Data.AccessToken == "" {
		t.Fatalf("login %s: status %d, %v", openid, resp.StatusCode, err)
	}
	return env.Data.AccessToken
}

type phone struct {
	paho.Client
	lost chan error
}

// dialPhone connects an MQTT 3.1.1 client over WebSocket to /mqtt, as the
// mini-program SDK does (password = access token, subprotocol "mqtt").
func dialPhone(e *Edge, id, token string) (*phone, error) {
	p := &phone{lost: make(chan error, 1)}
	opts := paho.NewClientOptions().AddBroker("ws://" + e.HTTPAddr() + "/mqtt").SetClientID(id).
		SetUsername("ignored").SetPassword(token).SetProtocolVersion(4).SetCleanSession(true).
		SetAutoReconnect(false).SetConnectRetry(false).SetConnectTimeout(5 * time.Second).
		SetConnectionLostHandler(func(_ paho.Client, err error) { p.lost <- err })
	p.Client = paho.NewClient(opts)
	tok := p.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return nil, fmt.Errorf("connect timed out")
	}
	return p, tok.Error()
}

func mustPhone(t *testing.T, e *Edge, id, token string) *phone {
	t.Helper()
	p, err := dialPhone(e, id, token)
	if err != nil {
		t.Fatalf("phone %s: %v", id, err)
	}
	t.Cleanup(func() { p.Disconnect(50) })
	return p
}

// viewerOwning makes user a viewer owning device (admin is an admin's
// token) and returns the user's access token.
func viewerOwning(t *testing.T, e *Edge, admin, user, device string) string {
	t.Helper()
	if st := call(t, e, "PUT", "/api/v1/users/"+user, admin, map[string]any{"roles": []string{"viewer"}}); st != 200 {
		t.Fatalf("put user: %d", st)
	}
	if st := call(t, e, "PUT", "/api/v1/devices/"+device+"/meta", admin, map[string]any{"owners": []string{user}}); st != 200 {
		t.Fatalf("put meta: %d", st)
	}
	return devLogin(t, e, user)
}

// dialDevice connects a device's MQTT client (no reconnection) to the
// broker at addr until the test ends.
func dialDevice(t *testing.T, addr, id string) paho.Client {
	t.Helper()
	dev := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(id).SetAutoReconnect(false))
	wait(t, dev.Connect(), "device connect")
	t.Cleanup(func() { dev.Disconnect(50) })
	return dev
}

func wait(t *testing.T, tok paho.Token, what string) {
	t.Helper()
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("%s: %v", what, tok.Error())
	}
}

func subcodes(t *testing.T, p *phone, filters map[string]byte, cb paho.MessageHandler) map[string]byte {
	t.Helper()
	tok := p.SubscribeMultiple(filters, cb)
	wait(t, tok, "subscribe")
	return tok.(*paho.SubscribeToken).Result()
}

func reading(n int) string {
	return fmt.Sprintf(`{"ts": %d, "metrics": {"n": %d}}`, time.Now().UnixMilli(), n)
}

// TestLivePhoneSessions: over WebSocket at /mqtt a phone connects only with
// a valid access token, may subscribe to exactly the per-device topics of
// devices the policy lets it read (others and wildcards get a SUBACK
// failure), receives a reading a device published over TCP once it is
// stored, stops receiving it and is unsubscribed when it loses its role,
// and is disconnected when it publishes.
func TestLivePhoneSessions(t *testing.T) {
	e := liveEdge(t, nil)
	root := devLogin(t, e, "root")
	u1 := viewerOwning(t, e, root, "u1", "d1")

	if _, err := dialPhone(e, "bad", "not-a-token"); err == nil {
		t.Fatal("a phone with an invalid token connected")
	}
	if resp, err := http.Get("http://" + e.HTTPAddr() + "/mqtt"); err != nil || resp.StatusCode != http.StatusUpgradeRequired {
		t.Fatalf("plain GET /mqtt: %v %v, want 426", resp, err)
	}

	msgs := make(chan string, 16)
	p := mustPhone(t, e, "p1", u1)
	// Paho routes a message to every callback whose filter matches, granted
	// or not: the refused filters get no callback.
	codes := subcodes(t, p, map[string]byte{
		"sensors/d1/telemetry": 1, "sensors/d1/state": 0, "devices/d1/desired": 1, "alerts/d1": 1,
	}, func(_ paho.Client, m paho.Message) { msgs <- m.Topic() + " " + string(m.Payload()) })
	for f, c := range subcodes(t, p, map[string]byte{
		"sensors/d2/telemetry": 1, "sensors/+/telemetry": 0, "sensors/#": 0, "devices/d1/other": 0,
	}, nil) {
		codes[f] = c
	}
	want := map[string]byte{
		"sensors/d1/telemetry": 1, "sensors/d1/state": 0, "devices/d1/desired": 1, "alerts/d1": 1,
		"sensors/d2/telemetry": 0x80, "sensors/+/telemetry": 0x80, "sensors/#": 0x80, "devices/d1/other": 0x80,
	}
	for f, c := range want {
		if codes[f] != c {
			t.Errorf("SUBACK for %s = %#x, want %#x", f, codes[f], c)
		}
	}

	// An admin phone is the control: it sees what u1 must not.
	ctl := make(chan string, 16)
	admin := mustPhone(t, e, "p2", root)
	subcodes(t, admin, map[string]byte{"sensors/d1/telemetry": 1}, func(_ paho.Client, m paho.Message) { ctl <- string(m.Payload()) })

	dev := dialDevice(t, e.MQTTAddr(), "d1")
	r1 := reading(1)
	wait(t, dev.Publish("sensors/d1/telemetry", 1, false, r1), "device publish")
	select {
	case m := <-msgs:
		if m != "sensors/d1/telemetry "+r1 {
			t.Fatalf("phone got %q, want the reading", m)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("phone received no reading within 10s")
	}
	<-ctl

	// u1 loses the viewer role: the subscription goes.
	if st := call(t, e, "PUT", "/api/v1/users/u1", root, map[string]any{"roles": []string{}}); st != 200 {
		t.Fatalf("put user: %d", st)
	}
	deadline := time.Now().Add(10 * time.Second)
	for subcodes(t, p, map[string]byte{"sensors/d1/telemetry": 1}, nil)["sensors/d1/telemetry"] != 0x80 {
		if time.Now().After(deadline) {
			t.Fatal("re-subscribing still granted 10s after the role was removed")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Phones get a topic's latest reading at the live rate
	// (mqtt.live_interval): the control phone may see reading 2, but it
	// sees reading 3.
	for i := 2; i <= 3; i++ {
		wait(t, dev.Publish("sensors/d1/telemetry", 1, false, reading(i)), "device publish")
	}
	controlOnly(t, ctl, msgs, 3, "losing access")

	// Phones publish nothing: the connection is closed.
	pub := mustPhone(t, e, "p3", root)
	pub.Publish("sensors/d1/telemetry", 0, false, reading(9))
	select {
	case <-pub.lost:
	case <-time.After(10 * time.Second):
		t.Fatal("a phone that published is still connected")
	}
}

// TestLivePhonePolicyChange: a policy change that takes a user's access
// away drops the user's live subscriptions at once (the engine's poll of
// the policy directory, then a re-check of every phone), not at the next
// periodic re-check, set here to an hour.
func TestLivePhonePolicyChange(t *testing.T) {
	dir := t.TempDir()
	authz, err := os.ReadFile("../../policies/authz.rego")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "authz.rego")
	if err := os.WriteFile(path, authz, 0o644); err != nil {
		t.Fatal(err)
	}
	e := liveEdge(t, func(c *Config) { c.Policy.Dir, c.phoneRecheck = dir, time.Hour })
	root := devLogin(t, e, "root")
	msgs := make(chan string, 16)
	p := mustPhone(t, e, "p1", viewerOwning(t, e, root, "u1", "d1"))
	if c := subcodes(t, p, map[string]byte{"sensors/d1/telemetry": 1}, func(_ paho.Client, m paho.Message) { msgs <- string(m.Payload()) }); c["sensors/d1/telemetry"] != 1 {
		t.Fatalf("SUBACK %#x, want 1 (u1 owns d1)", c["sensors/d1/telemetry"])
	}
	ctl := make(chan string, 16)
	subcodes(t, mustPhone(t, e, "p2", root), map[string]byte{"sensors/d1/telemetry": 1}, func(_ paho.Client, m paho.Message) { ctl <- string(m.Payload()) })
	dev := dialDevice(t, e.MQTTAddr(), "d1")
	wait(t, dev.Publish("sensors/d1/telemetry", 1, false, reading(1)), "device publish")
	for _, ch := range []chan string{msgs, ctl} {
		select {
		case <-ch:
		case <-time.After(10 * time.Second):
			t.Fatal("a phone received no reading within 10s")
		}
	}

	// Viewers may no longer read the devices they own.
	viewer := "\"viewer\": {\n\t\t\"device.list\": \"owner\",\n\t\t\"device.read\": \"owner\",\n"
	if !bytes.Contains(authz, []byte(viewer)) {
		t.Fatal("policies/authz.rego changed: update the viewer grants this test removes")
	}
	if err := os.WriteFile(path+".tmp", bytes.Replace(authz, []byte(viewer), []byte("\"viewer\": {\n"), 1), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		t.Fatal(err)
	}
	lost := func() float64 {
		m, err := benchproc.ScrapeAuth(http.DefaultClient, "http://"+e.HTTPAddr()+"/metrics", root)
		if err != nil {
			t.Fatal(err)
		}
		v, _ := m.Value(`outpost_mqtt_phone_ends_total{reason="access_lost"}`)
		return v
	}
	daemontest.Poll(t, 10*time.Second, "u1's subscription dropped after the policy change", func() bool { return lost() >= 1 })
	wait(t, dev.Publish("sensors/d1/telemetry", 1, false, reading(2)), "device publish")
	controlOnly(t, ctl, msgs, 2, "the policy took its access away")
}

// controlOnly waits for the control phone's feed ctl to bring reading n
// (the last published), then fails if the feed of a phone that lost
// access (after what) received anything.
func controlOnly(t *testing.T, ctl, lost <-chan string, n int, after string) {
	t.Helper()
	for last := time.After(10 * time.Second); ; {
		select {
		case m := <-ctl:
			if !strings.HasSuffix(m, fmt.Sprintf(`"n": %d}}`, n)) {
				continue
			}
		case <-last:
			t.Fatalf("control phone did not receive reading %d within 10s", n)
		}
		break
	}
	select {
	case m := <-lost:
		t.Fatalf("phone still received %q after %s", m, after)
	default:
	}
}

// TestLivePhoneTokenExpiry: a phone's connection closes when its access
// token expires, and an expired token cannot connect.
func TestLivePhoneTokenExpiry(t *testing.T) {
	e := liveEdge(t, func(c *Config) { c.Auth.AccessTTL = 2 * time.Second })
	tok := devLogin(t, e, "root")
	p := mustPhone(t, e, "p1", tok)
	start := time.Now()
	select {
	case <-p.lost:
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("closed %s after connect, want at the token's expiry (2 s)", d)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("connection still open 15s after the token expired")
	}
	if _, err := dialPhone(e, "p2", tok); err == nil {
		t.Fatal("an expired token connected")
	}
}

// TestLivePhoneSessionRevoked: a phone's connection closes when its session
// is revoked (here by the reuse of a rotated refresh token) at the next
// recheck, and the revoked token cannot connect again.
func TestLivePhoneSessionRevoked(t *testing.T) {
	e := liveEdge(t, func(c *Config) { c.Auth.RefreshReuseGrace = -1 })
	resp, err := http.Post("http://"+e.HTTPAddr()+"/api/v1/auth/login", "application/json", bytes.NewReader([]byte(`{"code":"dev:root"}`)))
	if err != nil {
		t.Fatal(err)
	}
	var env struct {
		Data struct {
			AccessToken  string `json:"access_token"`
			RefreshToken string `json:"refresh_token"`
		} `json:"data"`
	}
	err = json.NewDecoder(resp.Body).Decode(&env)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	p := mustPhone(t, e, "p1", env.Data.AccessToken)
	body := map[string]string{"refresh_token": env.Data.RefreshToken}
	if st := call(t, e, "POST", "/api/v1/auth/refresh", "", body); st != 200 {
		t.Fatalf("refresh: %d", st)
	}
	if st := call(t, e, "POST", "/api/v1/auth/refresh", "", body); st != 401 {
		t.Fatalf("reused refresh: %d, want 401 (session revoked)", st)
	}
	e.brk.RecheckPhones() // the periodic recheck, now
	select {
	case <-p.lost:
	case <-time.After(10 * time.Second):
		t.Fatal("the phone of a revoked session is still connected")
	}
	if _, err := dialPhone(e, "p2", env.Data.AccessToken); err == nil {
		t.Fatal("a revoked session's token connected")
	}
}
