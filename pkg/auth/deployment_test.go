package auth

import (
	"context"
	"crypto/ed25519"
	"errors"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// TestIssuerSessions: a cloud session's tokens name their family; a refresh
// keeps the family and gets a new token id (what the replicated state
// compares and sets); a signed refresh token without a family (issued before
// sessions were tracked) is refused.
func TestIssuerSessions(t *testing.T) {
	ctx := context.Background()
	clk := newClock()
	seed := make([]byte, ed25519.SeedSize)
	ring, err := NewMemoryKeyring(seed, clk.Now)
	if err != nil {
		t.Fatal(err)
	}
	is := NewIssuer(ring, IssuerConfig{Issuer: "cloud", Now: clk.Now})
	pair, sess, err := is.Issue(ctx, "o1")
	if err != nil {
		t.Fatal(err)
	}
	ac, err := is.Verify(pair.AccessToken)
	if err != nil || ac.Family != sess.Family || sess.Family == "" || sess.TokenID == "" {
		t.Fatalf("access claims %+v session %+v: %v", ac, sess, err)
	}
	clk.Advance(time.Minute)
	next, presented, nextSess, err := is.Refresh(ctx, pair.RefreshToken)
	if err != nil {
		t.Fatal(err)
	}
	if presented.ID != sess.TokenID || presented.Family != sess.Family || nextSess.Family != sess.Family ||
		nextSess.TokenID == sess.TokenID || !nextSess.Expires.After(sess.Expires) {
		t.Fatalf("presented %+v, next %+v, first %+v", presented, nextSess, sess)
	}
	// Offline, an edge reads the same claims.
	rc, err := NewRefreshVerifier(ring, DefaultLeeway, clk.Now).Verify(next.RefreshToken)
	if err != nil || rc.Family != sess.Family || rc.ID != nextSess.TokenID {
		t.Fatalf("offline claims %+v: %v", rc, err)
	}

	kid, priv := ring.signer()
	legacy := jwt.NewWithClaims(jwt.SigningMethodEdDSA, jwt.RegisteredClaims{Subject: "o1", ID: "j",
		IssuedAt: jwt.NewNumericDate(clk.Now()), ExpiresAt: jwt.NewNumericDate(clk.Now().Add(time.Hour))})
	legacy.Header["kid"], legacy.Header["typ"] = kid, refreshTyp
	old, err := legacy.SignedString(priv)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		token string
		want  error
	}{
		{"no family", old, ErrRefreshNotFound},
		{"access token as refresh", pair.AccessToken, ErrRefreshNotFound},
		{"garbage", "a.b.c", ErrRefreshNotFound},
	}
	for _, tc := range tests {
		if _, _, _, err := is.Refresh(ctx, tc.token); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
	clk.Advance(DefaultRefreshTTL + time.Hour)
	if _, _, _, err := is.Refresh(ctx, next.RefreshToken); !errors.Is(err, ErrRefreshExpired) {
		t.Errorf("expired: %v", err)
	}
}
