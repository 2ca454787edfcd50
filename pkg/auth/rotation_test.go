package auth

import (
	"context"
	"path/filepath"
	"testing"
	"time"
)

// TestMaintainRotatesSigningKey: once the signing key is older than
// KeyRotation, Maintain replaces it; tokens signed by the old key keep
// verifying (nobody is logged out) and new tokens carry the new kid.
func TestMaintainRotatesSigningKey(t *testing.T) {
	clk := newClock()
	dir := t.TempDir()
	keys := openKeyring(t, filepath.Join(dir, "keys"), clk)
	s, err := NewService(keys, openDB(t, dir), Config{Issuer: "edge-test", Now: clk.Now,
		AccessTTL: 2 * time.Hour, KeyRotation: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	first := keys.SigningKID()
	old := issue(t, s, "o-alice")

	clk.Advance(30 * time.Minute)
	if err := s.Maintain(ctx); err != nil {
		t.Fatal(err)
	}
	if keys.SigningKID() != first {
		t.Fatal("rotated a key younger than KeyRotation")
	}

	clk.Advance(45 * time.Minute)
	if err := s.Maintain(ctx); err != nil {
		t.Fatal(err)
	}
	second := keys.SigningKID()
	if second == first {
		t.Fatal("Maintain did not rotate a signing key older than KeyRotation")
	}
	if _, err := s.Verify(old.AccessToken); err != nil {
		t.Fatalf("a token signed before the rotation no longer verifies: %v", err)
	}
	c, err := s.Verify(issue(t, s, "o-bob").AccessToken)
	if err != nil || c.KeyID != second {
		t.Fatalf("new token kid %q (%v), want %q", c.KeyID, err, second)
	}
	// The rotation is on disk: a restart signs with the new key.
	if k2 := openKeyring(t, filepath.Join(dir, "keys"), clk); k2.SigningKID() != second {
		t.Fatalf("after reopen signing kid %q, want %q", k2.SigningKID(), second)
	}
}
