package syncer

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Revocations refuse by family and by the user's watermark, forget what
// expired, and survive a restart (reloaded from the store).
func TestRevocations(t *testing.T) {
	path := filepath.Join(t.TempDir(), "edge.db")
	st, err := store.Open(path, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	now := time.UnixMilli(1_000_000)
	clock := func() time.Time { return now }
	r, err := loadRevocations(st, clock)
	if err != nil {
		t.Fatal(err)
	}
	ms := func(v int64) time.Time { return time.UnixMilli(v) }
	if err := r.add([]*wire.Sessions{
		{OpenID: "o1", Families: []string{"f1"}, UntilMs: 2_000_000},
		{OpenID: "o2", Families: []string{"f2"}, BeforeMs: 900_000, UntilMs: 3_000_000},
		{OpenID: "o3", Families: []string{"gone"}, BeforeMs: 1, UntilMs: 999_999}, // already expired
	}); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		claims auth.Claims
		want   bool
	}{
		{"revoked family", auth.Claims{OpenID: "o1", Family: "f1", IssuedAt: ms(990_000)}, true},
		{"other family of the same user", auth.Claims{OpenID: "o1", Family: "f9", IssuedAt: ms(990_000)}, false},
		{"issued before the watermark", auth.Claims{OpenID: "o2", Family: "f3", IssuedAt: ms(899_000)}, true},
		{"issued after the watermark", auth.Claims{OpenID: "o2", Family: "f3", IssuedAt: ms(900_000)}, false},
		{"no family, before the watermark", auth.Claims{OpenID: "o2", IssuedAt: ms(800_000)}, true},
		{"expired revocation forgotten", auth.Claims{OpenID: "o3", Family: "gone", IssuedAt: ms(0)}, false},
		{"unrelated user", auth.Claims{OpenID: "o4", IssuedAt: ms(0)}, false},
	}
	check := func(r *Revocations) {
		t.Helper()
		for _, tc := range tests {
			if got := r.Revoked(tc.claims); got != tc.want {
				t.Errorf("%s: revoked %v, want %v", tc.name, got, tc.want)
			}
		}
	}
	check(r)
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	st, err = store.Open(path, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	again, err := loadRevocations(st, clock)
	if err != nil {
		t.Fatal(err)
	}
	check(again)
	// Past f1's lifetime the next update forgets it.
	now = time.UnixMilli(2_500_000)
	if err := again.add([]*wire.Sessions{{OpenID: "o5", Families: []string{"f5"}, UntilMs: 4_000_000}}); err != nil {
		t.Fatal(err)
	}
	if len(again.state.Families) != 2 || again.Revoked(auth.Claims{OpenID: "o1", Family: "f1"}) {
		t.Fatalf("families after expiry: %v", again.state.Families)
	}
	var nilRevs *Revocations
	if nilRevs.Revoked(auth.Claims{OpenID: "o1", Family: "f1"}) {
		t.Fatal("nil Revocations revoked something")
	}
}
