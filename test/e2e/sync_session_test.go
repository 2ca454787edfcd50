package e2e

import (
	"encoding/json"
	"net/http"
	"testing"
	"time"
)

// Cloud sessions rotate with reuse detection and are revocable, and
// revocations reach an edge: a phone logs in through an edge and refreshes
// twice through the cloud (each answer a new refresh token); presenting the
// first refresh token again answers 401 and revokes the session, so the
// newest token is refused too. A second session is revoked through the
// cloud's API (on a follower, forwarded to the leader): refresh fails at
// the cloud, and once the edge has pulled, its access token is refused at
// the edge and — with the cloud unreachable — the edge's offline refresh
// refuses it, while a session started after the revocation keeps working
// offline.
func TestSyncSessionRotationAndRevocation(t *testing.T) {
	wx, _ := fakeWeChat(t)
	c := startCloudCluster(t, 3, cloudWithArgs("-wechat-appid", "wx-test", "-wechat-secret", "s3cret", "-wechat-api-base", wx.URL))
	link := newSyncLink(t, c)
	e := startSyncEdge(t, "e2", link)

	login := func() syncPair {
		t.Helper()
		var p syncPair
		cloudWaitFor(t, 20*time.Second, "login through the edge", func() bool {
			code, env, err := e.rawCall(http.MethodPost, "/api/v1/auth/login", "", map[string]string{"code": "c-phone"})
			return err == nil && code == 200 && json.Unmarshal(env.Data, &p) == nil && p.RefreshToken != ""
		})
		return p
	}
	refresh := func(tok string) (int, string, syncPair) {
		t.Helper()
		var p syncPair
		code, env, err := e.rawCall(http.MethodPost, "/api/v1/auth/refresh", "", map[string]string{"refresh_token": tok})
		if err != nil {
			t.Fatalf("refresh: %v", err)
		}
		if code == 200 {
			_ = json.Unmarshal(env.Data, &p)
		}
		return code, env.Message, p
	}

	// Rotation: every refresh returns a new refresh token.
	p0 := login()
	code, msg, p1 := refresh(p0.RefreshToken)
	if code != 200 || p1.RefreshToken == p0.RefreshToken {
		t.Fatalf("first refresh: %d %s", code, msg)
	}
	code, msg, p2 := refresh(p1.RefreshToken)
	if code != 200 || p2.RefreshToken == p1.RefreshToken {
		t.Fatalf("second refresh: %d %s", code, msg)
	}
	// Reuse of an already-rotated token revokes the whole session.
	const reused = "refresh token was already used: the session is revoked, log in again"
	if code, msg, _ := refresh(p0.RefreshToken); code != 401 || msg != reused {
		t.Fatalf("reused refresh token: %d %q, want 401 %q", code, msg, reused)
	}
	if code, msg, _ := refresh(p2.RefreshToken); code != 401 || msg != "refresh token revoked: log in again" {
		t.Fatalf("newest token of a revoked session: %d %q, want 401 revoked", code, msg)
	}
	// A follower answers the same (it forwards refreshes to the leader).
	follower := c.Nodes[1]
	if i, ok := c.leader(); ok && i == 1 {
		follower = c.Nodes[2]
	}
	if code, env, _ := c.apiTok(follower, http.MethodPost, "/api/v1/auth/refresh", map[string]string{"refresh_token": p1.RefreshToken}, ""); code != 401 || env.Message != "refresh token revoked: log in again" {
		t.Fatalf("refresh of a revoked session at follower %s: %d %q", follower.ID, code, env.Message)
	}

	// Revocation of a user's sessions through the cloud API.
	s0 := login()
	code, msg, s1 := refresh(s0.RefreshToken)
	if code != 200 {
		t.Fatalf("refresh of the second session: %d %s", code, msg)
	}
	if code, _, _ := e.rawCall(http.MethodGet, "/api/v1/edge", s1.AccessToken, nil); code != 200 {
		t.Fatalf("live session at the edge: %d", code) // and now in its verified-token cache
	}
	code, env, err := c.api(follower, http.MethodDelete, "/api/v1/users/o-phone/sessions", nil)
	var rev struct {
		Revoked int `json:"revoked_sessions"`
	}
	if err != nil || code != 200 || json.Unmarshal(env.Data, &rev) != nil || rev.Revoked != 1 {
		t.Fatalf("revoke sessions: %d %s %v (%+v), want 1 live session revoked", code, env.Message, err, rev)
	}
	if code, msg, _ := refresh(s1.RefreshToken); code != 401 || msg != "refresh token revoked: log in again" {
		t.Fatalf("refresh after revocation: %d %q, want 401 revoked", code, msg)
	}
	// The follower reads its own replica, which applies the revocation a
	// moment after the leader committed it.
	cloudWaitFor(t, 10*time.Second, "the cloud refuses the revoked session's access token", func() bool {
		code, _, _ := c.apiTok(follower, http.MethodGet, "/api/v1/devices/x", nil, s1.AccessToken)
		return code == 401
	})
	// The edge learns the revocation with its next pull: the revoked
	// session's access token is refused from then on (also when the edge
	// had it in its verified-token cache).
	cloudWaitFor(t, 10*time.Second, "the edge refuses the revoked session's access token", func() bool {
		code, _, err := e.rawCall(http.MethodGet, "/api/v1/edge", s1.AccessToken, nil)
		return err == nil && code == 401
	})
	fresh := login() // after the revocation: unaffected

	// Offline, the edge refuses the revoked session's refresh token but
	// keeps the new session alive.
	link.cut(true)
	if code, msg, _ := refresh(s1.RefreshToken); code != 401 || msg != "refresh token revoked: log in again" {
		t.Fatalf("offline refresh of a revoked session: %d %q, want 401 revoked", code, msg)
	}
	code, msg, off := refresh(fresh.RefreshToken)
	if code != 200 || off.AccessToken == "" {
		t.Fatalf("offline refresh of a session started after the revocation: %d %q", code, msg)
	}
	if code, _, _ := e.rawCall(http.MethodGet, "/api/v1/edge", off.AccessToken, nil); code != 200 {
		t.Errorf("offline-minted access token: %d, want 200", code)
	}
}
