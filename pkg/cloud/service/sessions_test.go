package service

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	uauth "github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/cloud/auth"
	"github.com/outpost-edge/outpost/pkg/wechat"
)

// fakeWeChat serves code2session: "ok-<openid>" logs that user in; the
// other codes answer WeChat's error codes.
func fakeWeChat(t *testing.T) *wechat.Client {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		code := r.URL.Query().Get("js_code")
		w.Header().Set("Content-Type", "application/json")
		if r.URL.Path != "/sns/jscode2session" {
			http.NotFound(w, r)
			return
		}
		if openid, ok := strings.CutPrefix(code, "ok-"); ok {
			_ = json.NewEncoder(w).Encode(map[string]string{"openid": openid, "session_key": "k"})
			return
		}
		errcode := map[string]int{"bad": 40029, "limited": 45011, "blocked": 40226, "busy": -1}[code]
		_ = json.NewEncoder(w).Encode(map[string]any{"errcode": errcode, "errmsg": code})
	}))
	t.Cleanup(srv.Close)
	c, err := wechat.New(wechat.Config{APIBase: srv.URL, AppID: "wxapp", Secret: "s3cret", HTTPClient: srv.Client()})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestLoginRefreshRotationAndReuse(t *testing.T) {
	n := startService(t, Config{WeChat: fakeWeChat(t), Admins: []string{"alice"}})
	ctx := context.Background()

	if _, err := n.svc.Refresh(ctx, "anything"); !errors.Is(err, ErrRefreshUnknown) {
		t.Fatalf("refresh before any key exists: err = %v, want ErrRefreshUnknown", err)
	}
	first, err := n.svc.Login(ctx, "ok-alice")
	if err != nil {
		t.Fatal(err)
	}
	if first.OpenID != "alice" || first.AccessToken == "" || first.RefreshToken == "" {
		t.Fatalf("pair %+v", first)
	}
	keys, err := n.svc.KeySet()
	if err != nil {
		t.Fatal(err)
	}
	var set uauth.JWKS
	if err := json.Unmarshal(keys, &set); err != nil || len(set.Keys) != 1 {
		t.Fatalf("key set %s: %v", keys, err)
	}
	p, err := n.svc.Authenticate(ctx, first.AccessToken)
	if err != nil || p.Kind != auth.KindUser || p.Subject != "alice" || !slices.Contains(p.Roles, "admin") {
		t.Fatalf("principal %+v, err %v: want user alice with the admin role", p, err)
	}

	second, err := n.svc.Refresh(ctx, first.RefreshToken)
	if err != nil {
		t.Fatal(err)
	}
	if second.RefreshToken == first.RefreshToken {
		t.Fatal("refresh did not rotate the refresh token")
	}
	if _, err := n.svc.Authenticate(ctx, second.AccessToken); err != nil {
		t.Fatalf("rotated access token: %v", err)
	}
	third, err := n.svc.Refresh(ctx, second.RefreshToken)
	if err != nil {
		t.Fatal(err)
	}
	// The first token again (not a retry of the last refresh, which the
	// reuse grace would answer): reuse, which revokes the whole session.
	if _, err := n.svc.Refresh(ctx, first.RefreshToken); !errors.Is(err, ErrRefreshReused) {
		t.Fatalf("reused refresh token: err = %v, want ErrRefreshReused", err)
	}
	if _, err := n.svc.Refresh(ctx, third.RefreshToken); !errors.Is(err, ErrRefreshRevoked) {
		t.Fatalf("refresh after reuse: err = %v, want ErrRefreshRevoked", err)
	}
	for _, p := range []uauth.Pair{second, third} {
		if _, err := n.svc.Authenticate(ctx, p.AccessToken); !errors.Is(err, auth.ErrUnauthenticated) {
			t.Fatalf("access token of a revoked session: err = %v, want ErrUnauthenticated", err)
		}
	}
	if _, err := n.svc.Refresh(ctx, "not.a.token"); !errors.Is(err, ErrRefreshUnknown) {
		t.Fatalf("garbage refresh token: err = %v, want ErrRefreshUnknown", err)
	}
	if _, err := n.svc.Authenticate(ctx, "static-token"); !errors.Is(err, auth.ErrUnauthenticated) {
		t.Fatalf("a non-JWT token: err = %v, want ErrUnauthenticated (the chain's next link decides)", err)
	}
}

func TestRevokeSessions(t *testing.T) {
	n := startService(t, Config{WeChat: fakeWeChat(t)})
	ctx := context.Background()
	a, err := n.svc.Login(ctx, "ok-bob")
	if err != nil {
		t.Fatal(err)
	}
	b, err := n.svc.Login(ctx, "ok-bob")
	if err != nil {
		t.Fatal(err)
	}
	other, err := n.svc.Login(ctx, "ok-carol")
	if err != nil {
		t.Fatal(err)
	}
	rev, err := n.svc.RevokeSessions(ctx, "bob")
	if err != nil {
		t.Fatal(err)
	}
	if rev.OpenID != "bob" || rev.Sessions != 2 || rev.BeforeMs == 0 {
		t.Fatalf("revocation %+v, want bob's 2 sessions", rev)
	}
	for _, pair := range []uauth.Pair{a, b} {
		if _, err := n.svc.Refresh(ctx, pair.RefreshToken); !errors.Is(err, ErrRefreshRevoked) {
			t.Fatalf("refresh after revocation: err = %v, want ErrRefreshRevoked", err)
		}
		if _, err := n.svc.Authenticate(ctx, pair.AccessToken); !errors.Is(err, auth.ErrUnauthenticated) {
			t.Fatalf("access after revocation: err = %v, want ErrUnauthenticated", err)
		}
	}
	if _, err := n.svc.Refresh(ctx, other.RefreshToken); err != nil {
		t.Fatalf("another user's session was revoked too: %v", err)
	}
}

func TestLoginErrors(t *testing.T) {
	n := startService(t, Config{WeChat: fakeWeChat(t)})
	ctx := context.Background()
	cases := []struct {
		code string
		want error
	}{
		{"bad", ErrInvalidCode},
		{"limited", ErrLoginRateLimited},
		{"blocked", ErrUserBlocked},
		{"busy", ErrWeChatUnavailable},
		{"dev:alice", ErrDevLoginDisabled},
	}
	for _, tc := range cases {
		if _, err := n.svc.Login(ctx, tc.code); !errors.Is(err, tc.want) {
			t.Errorf("login %q: err = %v, want %v", tc.code, err, tc.want)
		}
	}

	// Without WeChat credentials, only dev login (when enabled) works.
	dev := startService(t, Config{DevLogin: true})
	if p, err := dev.svc.Login(ctx, "dev:alice"); err != nil || p.OpenID != "alice" {
		t.Fatalf("dev login: %+v, err %v", p, err)
	}
	if _, err := dev.svc.Login(ctx, "dev:../x"); !errors.Is(err, ErrBadOpenID) {
		t.Fatalf("dev login with a bad openid: err = %v, want ErrBadOpenID", err)
	}
	if _, err := dev.svc.Login(ctx, "wx-code"); !errors.Is(err, ErrLoginUnavailable) {
		t.Fatalf("WeChat login without credentials: err = %v, want ErrLoginUnavailable", err)
	}
}

// TestPurgeSessions: maintenance removes sessions once they expired (plus
// the verification leeway), in bounded proposals, and leaves live ones.
func TestPurgeSessions(t *testing.T) {
	n := startService(t, Config{DevLogin: true, RefreshTTL: time.Minute})
	ctx := context.Background()
	for _, u := range []string{"a", "b"} {
		if _, err := n.svc.Login(ctx, "dev:"+u); err != nil {
			t.Fatal(err)
		}
	}
	if got := n.svc.purgeSessions(ctx); got != 0 {
		t.Fatalf("purged %d live sessions", got)
	}
	n.offset.Store((time.Minute + 2*uauth.DefaultLeeway + time.Second).Milliseconds())
	if got := n.svc.purgeSessions(ctx); got < 2 {
		t.Fatalf("purged %d records, want both expired sessions", got)
	}
	if families, _ := n.fsm.SessionCounts(); families != 0 {
		t.Fatalf("%d sessions left after the purge", families)
	}
}
