package e2e

import (
	"encoding/json"
	"net/http"
	"testing"
	"time"
)

// cloudWithUsers makes the cluster issue users' tokens (dev login, "admin"
// an admin): tokens signed by the deployment key, which the cloud accepts
// as proof of an edge's changes, unlike an edge's own dev login.
func cloudWithUsers(extra ...string) cloudClusterOpt {
	return cloudWithArgs(append([]string{"-dev-login", "-admin", "admin"}, extra...)...)
}

// cloudLogin logs openid in at the cloud and returns the access token.
func (c *cloudCluster) cloudLogin(t *testing.T, openid string) string {
	t.Helper()
	code, env, err := c.apiTok(c.Nodes[0], http.MethodPost, "/api/v1/auth/login", map[string]string{"code": "dev:" + openid}, "")
	if err != nil || code != 200 {
		t.Fatalf("cloud login %s: %d %s %v", openid, code, env.Message, err)
	}
	var p syncPair
	if err := json.Unmarshal(env.Data, &p); err != nil || p.AccessToken == "" {
		t.Fatalf("cloud login %s: %s %v", openid, env.Data, err)
	}
	return p.AccessToken
}

// edgeTrusts waits until the edge accepts a cloud-issued token for openid
// (it pulled the deployment key and the user's roles) and returns a fresh
// one.
func edgeTrusts(t *testing.T, c *cloudCluster, e *edgeProc, openid, device string) string {
	t.Helper()
	var tok string
	cloudWaitFor(t, 30*time.Second, "the edge accepts "+openid+"'s cloud token", func() bool {
		tok = c.cloudLogin(t, openid)
		code, _, err := e.rawCall(http.MethodGet, "/api/v1/devices/"+device, tok, nil)
		if err != nil || code != 200 {
			time.Sleep(200 * time.Millisecond) // one session per try: do not flood the cloud
			return false
		}
		return true
	})
	return tok
}

// TestSyncOfflineDesiredOnOriginalProof: edge restriction (issue 11, "What
// to build" 3, findings 3 and 2). An operator's desired write made while
// the edge is offline, with a token that has expired by the time the link
// returns, is accepted by the cloud on its original proof; a write made
// with the edge's own dev login (no proof the cloud trusts) is refused and
// counted, and the edge's copy returns to the cloud's value. Edge and cloud
// hold the same desired state afterwards.
func TestSyncOfflineDesiredOnOriginalProof(t *testing.T) {
	const ttl = 2 * time.Second
	c := startCloudCluster(t, 1, cloudWithUsers("-access-ttl", ttl.String()))
	link := newSyncLink(t, c)
	e := startSyncEdge(t, "e2", link)
	dev := "valve-1"
	mq := edgeConnect(t, e.MQTT, dev)
	if tk := mq.Publish("sensors/"+dev+"/state", 1, false, []byte(`{"state":{"fw":"1.0"}}`)); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("publish state: %v", tk.Error())
	}
	cloudWaitFor(t, 20*time.Second, "the cloud knows the device's home edge", func() bool {
		d, err := c.deviceState(c.Nodes[0], dev)
		return err == nil && d.EdgeID == "e2"
	})
	if code, env, err := c.api(c.Nodes[0], http.MethodPut, "/api/v1/users/o-op", map[string]any{"roles": []string{"operator"}, "regions": []string{"default"}}); err != nil || code != 200 {
		t.Fatalf("grant operator: %d %s %v", code, env.Message, err)
	}
	op := edgeTrusts(t, c, e, "o-op", dev)
	local := e.login() // the edge's own dev login: signed by the edge's key

	link.cut(true)
	put := func(tok, state string) {
		t.Helper()
		if err := e.api(http.MethodPut, "/api/v1/devices/"+dev+"/desired", tok, map[string]json.RawMessage{"state": json.RawMessage(state)}, nil); err != nil {
			t.Fatal(err)
		}
	}
	put(op, `{"mode":"offline"}`)
	time.Sleep(5 * time.Millisecond)
	put(local, `{"fan":"on"}`)
	// The operator's token expires (past the leeway) before the link returns.
	cloudWaitFor(t, 90*time.Second, "the operator's access token expired", func() bool {
		code, _, err := e.rawCall(http.MethodGet, "/api/v1/devices/"+dev, op, nil)
		return err == nil && code == 401
	})
	link.cut(false)

	cloudWaitFor(t, 30*time.Second, "the cloud accepted the offline write on its original proof", func() bool {
		d, err := c.deviceState(c.Nodes[0], dev)
		return err == nil && jsonEqual(d.Desired["mode"], []byte(`"offline"`))
	})
	cloudWaitFor(t, 30*time.Second, "the unproven write is refused and counted", func() bool {
		v, ok := c.labelled(c.Nodes[0], `outpost_cloud_changes_refused_total{edge="e2",reason="proof_untrusted_key"}`)
		return ok && v >= 1
	})
	admin := e.login()
	var edgeState, cloudState syncDeviceState
	cloudWaitFor(t, 30*time.Second, "edge and cloud converge on the cloud's value", func() bool {
		var err1, err2 error
		edgeState, err1 = e.deviceState(admin, dev)
		cloudState, err2 = c.deviceState(c.Nodes[0], dev)
		return err1 == nil && err2 == nil && sameDesired(edgeState.Desired, cloudState.Desired) &&
			edgeState.DesiredVersion == cloudState.DesiredVersion
	})
	if _, ok := cloudState.Desired["fan"]; ok {
		t.Fatalf("the cloud stored the refused write: %s", cloudState)
	}
	if _, ok := edgeState.Desired["fan"]; ok {
		t.Fatalf("the edge kept the refused write: %s", edgeState)
	}
	if !jsonEqual(edgeState.Desired["mode"], []byte(`"offline"`)) {
		t.Fatalf("edge state %s, want the operator's write", edgeState)
	}
}
