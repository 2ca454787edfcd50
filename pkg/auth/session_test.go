package auth

import (
	"context"
	"errors"
	"path/filepath"
	"testing"
	"time"
)

// Sessions: access tokens survived refresh-reuse revocation for up to 15
// minutes (the access TTL). Every access token now names its session, and
// Verify refuses the tokens of a session revoked by reuse, logout or
// RevokeUser at once — across a restart too — while other sessions of the
// same user keep working.
func TestSecurityRevokedSessionAccessTokens(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	p1 := issue(t, e.svc, "o")
	other := issue(t, e.svc, "o")
	p2, err := e.svc.Refresh(ctx, p1.RefreshToken)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []Pair{p1, p2, other} {
		if c, err := e.svc.Verify(p.AccessToken); err != nil || c.Family == "" {
			t.Fatalf("live session: claims %+v, %v; want a session id", c, err)
		}
	}
	e.clk.Advance(DefaultRefreshReuseGrace + time.Second) // past the retry grace
	if _, err := e.svc.Refresh(ctx, p1.RefreshToken); !errors.Is(err, ErrRefreshReused) {
		t.Fatalf("reuse: %v", err)
	}
	for name, tok := range map[string]string{"first": p1.AccessToken, "rotated": p2.AccessToken} {
		if _, err := e.svc.Verify(tok); !errors.Is(err, ErrInvalidToken) {
			t.Fatalf("%s access token of the reused session: %v, want ErrInvalidToken", name, err)
		}
	}
	if _, err := e.svc.Verify(other.AccessToken); err != nil {
		t.Fatalf("other session: %v", err)
	}

	// Logout and RevokeUser end access tokens too.
	logout := issue(t, e.svc, "l")
	if err := e.svc.Revoke(ctx, logout.RefreshToken); err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.Verify(logout.AccessToken); !errors.Is(err, ErrInvalidToken) {
		t.Fatalf("after logout: %v", err)
	}
	u := issue(t, e.svc, "u")
	if n, err := e.svc.RevokeUser(ctx, "u"); err != nil || n != 1 {
		t.Fatalf("RevokeUser: %d %v", n, err)
	}
	if _, err := e.svc.Verify(u.AccessToken); !errors.Is(err, ErrInvalidToken) {
		t.Fatalf("after RevokeUser: %v", err)
	}

	// A restarted service still refuses them.
	again := newService(t, openKeyring(t, filepath.Join(e.dir, "keys"), e.clk), e.db, e.clk)
	for _, tok := range []string{p2.AccessToken, logout.AccessToken, u.AccessToken} {
		if _, err := again.Verify(tok); !errors.Is(err, ErrInvalidToken) {
			t.Fatalf("after a restart: %v, want ErrInvalidToken", err)
		}
	}
	if _, err := again.Verify(other.AccessToken); err != nil {
		t.Fatalf("other session after a restart: %v", err)
	}

	// Once no token of theirs can verify, the revocations are forgotten.
	e.clk.Advance(DefaultAccessTTL + DefaultLeeway + 1)
	if err := again.Maintain(ctx); err != nil {
		t.Fatal(err)
	}
	again.revMu.RLock()
	n := len(again.revoked)
	again.revMu.RUnlock()
	if n != 0 {
		t.Fatalf("%d revocations kept past every token's expiry", n)
	}
}

// RevokeSession ends a session issued elsewhere (a cloud session an edge
// learned was revoked) for as long as asked.
func TestRevokeSessionOfAnotherIssuer(t *testing.T) {
	e := newEnv(t)
	tok, _, err := e.svc.AccessOnly("o", "cloud-family")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.Verify(tok); err != nil {
		t.Fatal(err)
	}
	if err := e.svc.RevokeSession("cloud-family", e.clk.Now().Add(DefaultRefreshTTL)); err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.Verify(tok); !errors.Is(err, ErrInvalidToken) {
		t.Fatalf("after RevokeSession: %v", err)
	}
}
