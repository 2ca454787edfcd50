package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// rawCall calls an edge's API and returns the status and envelope, whatever
// they are.
func (e *edgeProc) rawCall(method, path, token string, body any) (int, edgeEnvelope, error) {
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://"+e.HTTP+path, rd)
	if err != nil {
		return 0, edgeEnvelope{}, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := edgeHTTP.Do(req)
	if err != nil {
		return 0, edgeEnvelope{}, err
	}
	defer resp.Body.Close()
	var env edgeEnvelope
	raw, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(raw, &env); err != nil {
		return resp.StatusCode, env, fmt.Errorf("%s %s: %d %.200s", method, path, resp.StatusCode, raw)
	}
	return resp.StatusCode, env, nil
}

type syncPair struct {
	AccessToken  string `json:"access_token"`
	RefreshToken string `json:"refresh_token"`
	OpenID       string `json:"openid"`
}

// fakeWeChat answers code2session: code "c-X" is user "o-X".
func fakeWeChat(t *testing.T) (*httptest.Server, *atomic.Int64) {
	t.Helper()
	var calls atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		code := r.URL.Query().Get("js_code")
		w.Header().Set("Content-Type", "application/json")
		if r.URL.Path != "/sns/jscode2session" || !strings.HasPrefix(code, "c-") {
			fmt.Fprint(w, `{"errcode":40029,"errmsg":"invalid code"}`)
			return
		}
		fmt.Fprintf(w, `{"openid":"o-%s","session_key":"k"}`, strings.TrimPrefix(code, "c-"))
	}))
	t.Cleanup(srv.Close)
	return srv, &calls
}

// Identity across the deployment: a phone logs in at one edge (forwarded to
// the cloud, which asks WeChat and signs with the deployment key), is
// accepted at another edge, gets the roles written in the cloud at both,
// refreshes through an edge, and — with the cloud unreachable — keeps its
// session (access token verified offline, refresh answered offline) while a
// new login answers 503 saying why.
func TestSyncIdentityAcrossEdges(t *testing.T) {
	wx, _ := fakeWeChat(t)
	c := startCloudCluster(t, 1, cloudWithArgs("-wechat-appid", "wx-test", "-wechat-secret", "s3cret", "-wechat-api-base", wx.URL))
	linkA, linkB := newSyncLink(t, c), newSyncLink(t, c)
	a := startSyncEdge(t, "e2", linkA)
	b := startSyncEdge(t, "e3", linkB)

	// Roles are written once, in the cloud, and reach every edge.
	if code, env, err := c.api(c.Nodes[0], http.MethodPut, "/api/v1/users/o-phone", map[string]any{"roles": []string{"operator"}, "regions": []string{"default"}}); err != nil || code != 200 {
		t.Fatalf("put user: %d %s %v", code, env.Message, err)
	}

	var pair syncPair
	cloudWaitFor(t, 20*time.Second, "login through edge A", func() bool {
		code, env, err := a.rawCall(http.MethodPost, "/api/v1/auth/login", "", map[string]string{"code": "c-phone"})
		return err == nil && code == 200 && json.Unmarshal(env.Data, &pair) == nil && pair.OpenID == "o-phone"
	})
	for _, e := range []*edgeProc{a, b} {
		cloudWaitFor(t, 20*time.Second, "edge accepts the cloud-signed token with the cloud's roles", func() bool {
			code, _, err := e.rawCall(http.MethodGet, "/api/v1/edge", pair.AccessToken, nil)
			return err == nil && code == 200
		})
	}
	if code, env, _ := b.rawCall(http.MethodPost, "/api/v1/auth/login", "", map[string]string{"code": "bad"}); code != 400 {
		t.Errorf("login with a code WeChat refuses: %d %s, want 400", code, env.Message)
	}

	// Refresh through edge B reaches the cloud and rotates the session.
	var refreshed syncPair
	code, env, err := b.rawCall(http.MethodPost, "/api/v1/auth/refresh", "", map[string]string{"refresh_token": pair.RefreshToken})
	if err != nil || code != 200 || json.Unmarshal(env.Data, &refreshed) != nil || refreshed.RefreshToken == pair.RefreshToken {
		t.Fatalf("refresh through edge B: %d %s %v", code, env.Message, err)
	}
	if code, _, _ := a.rawCall(http.MethodGet, "/api/v1/edge", refreshed.AccessToken, nil); code != 200 {
		t.Fatalf("refreshed token at edge A: %d", code)
	}

	// The cloud becomes unreachable from edge B.
	linkB.cut(true)
	if code, _, _ := b.rawCall(http.MethodGet, "/api/v1/edge", refreshed.AccessToken, nil); code != 200 {
		t.Errorf("existing session offline: %d, want 200", code)
	}
	code, env, _ = b.rawCall(http.MethodPost, "/api/v1/auth/login", "", map[string]string{"code": "c-other"})
	if code != 503 || !strings.Contains(env.Message, "neither the cloud nor WeChat") {
		t.Errorf("login offline: %d %q, want 503 saying neither the cloud nor WeChat can be reached", code, env.Message)
	}
	var offline syncPair
	code, env, _ = b.rawCall(http.MethodPost, "/api/v1/auth/refresh", "", map[string]string{"refresh_token": refreshed.RefreshToken})
	if code != 200 || json.Unmarshal(env.Data, &offline) != nil || offline.AccessToken == "" {
		t.Fatalf("refresh offline: %d %s", code, env.Message)
	}
	if code, _, _ := b.rawCall(http.MethodGet, "/api/v1/edge", offline.AccessToken, nil); code != 200 {
		t.Errorf("offline-refreshed token at edge B: %d, want 200", code)
	}
	if code, _, _ := b.rawCall(http.MethodPost, "/api/v1/auth/refresh", "", map[string]string{"refresh_token": "x.y.z"}); code != 401 {
		t.Errorf("forged refresh token offline: %d, want 401", code)
	}
	// Dev login is local and works offline.
	if code, env, _ := b.rawCall(http.MethodPost, "/api/v1/auth/login", "", map[string]string{"code": "dev:admin"}); code != 200 {
		t.Errorf("dev login offline: %d %s", code, env.Message)
	}
}
