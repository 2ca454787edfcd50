package auth

import (
	"bytes"
	"context"
	"errors"
	"path/filepath"
	"slices"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// TestRefreshReuseGrace: a refresh retried with the same token within the
// grace, while its successor is unused, gets the identical pair and the
// session lives on; every other reuse — after the grace, of an older
// token, or after the successor was used — revokes the session, its access
// tokens included.
func TestRefreshReuseGrace(t *testing.T) {
	ctx := context.Background()
	grace := 30 * time.Second
	type step struct {
		advance time.Duration
		present int // index of the pair whose refresh token is presented
	}
	cases := []struct {
		name   string
		steps  []step // after pairs[0] (login) → pairs[1] (first refresh)
		replay bool   // the last step returns the identical pair
	}{
		{"retry at once", []step{{0, 0}}, true},
		{"retry at the end of the grace", []step{{grace, 0}}, true},
		{"two retries within the grace", []step{{time.Second, 0}, {time.Second, 0}}, true},
		{"retry after the grace", []step{{grace + time.Second, 0}}, false},
		{"reuse of an older token", []step{{time.Second, 1}, {time.Second, 2}, {0, 1}}, false},
		{"retry after the successor was used", []step{{time.Second, 1}, {0, 0}}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.svc = newServiceCfg(t, openKeyring(t, filepath.Join(e.dir, "keys"), e.clk), e.db,
				Config{Issuer: "edge-test", Now: e.clk.Now, RefreshReuseGrace: grace})
			pairs := []Pair{issue(t, e.svc, "o")}
			p1, err := e.svc.Refresh(ctx, pairs[0].RefreshToken)
			if err != nil {
				t.Fatal(err)
			}
			pairs = append(pairs, p1)
			var last Pair
			for i, st := range tc.steps {
				e.clk.Advance(st.advance)
				last, err = e.svc.Refresh(ctx, pairs[st.present].RefreshToken)
				if i == len(tc.steps)-1 {
					break
				}
				if err != nil {
					t.Fatalf("step %d: %v", i, err)
				}
				if !slices.Contains(pairs, last) {
					pairs = append(pairs, last)
				}
			}
			if !tc.replay {
				if !errors.Is(err, ErrRefreshReused) {
					t.Fatalf("reuse: %v, %+v; want ErrRefreshReused", err, last)
				}
				for i, p := range pairs {
					if _, err := e.svc.Verify(p.AccessToken); !errors.Is(err, ErrInvalidToken) {
						t.Errorf("access token %d of the revoked session: %v", i, err)
					}
				}
				if _, err := e.svc.Refresh(ctx, pairs[len(pairs)-1].RefreshToken); !errors.Is(err, ErrRefreshRevoked) {
					t.Errorf("newest refresh token after the reuse: %v, want ErrRefreshRevoked", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("retry within the grace: %v", err)
			}
			if last != pairs[1] {
				t.Fatalf("retry got another pair:\n%+v\nwant\n%+v", last, pairs[1])
			}
			if _, err := e.svc.Verify(last.AccessToken); err != nil {
				t.Fatalf("the retried pair's access token: %v", err)
			}
			// The session goes on from the retried pair.
			if _, err := e.svc.Refresh(ctx, last.RefreshToken); err != nil {
				t.Fatalf("refresh after the retry: %v", err)
			}
		})
	}
}

// TestRefreshReuseGraceStorage: the retry survives a restart (it is in the
// database), yet the database holds no token in the clear, so a copy of it
// yields no pair; a disabled grace revokes at once.
func TestRefreshReuseGraceStorage(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	p0 := issue(t, e.svc, "o")
	p1, err := e.svc.Refresh(ctx, p0.RefreshToken)
	if err != nil {
		t.Fatal(err)
	}
	err = e.db.View(func(tx *bolt.Tx) error {
		return tx.ForEach(func(name []byte, b *bolt.Bucket) error {
			return b.ForEach(func(k, v []byte) error {
				for _, secret := range []string{p0.RefreshToken, p1.RefreshToken, p1.AccessToken} {
					if bytes.Contains(k, []byte(secret)) || bytes.Contains(v, []byte(secret)) {
						t.Errorf("bucket %s holds a token in the clear", name)
					}
				}
				return nil
			})
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	again := newService(t, openKeyring(t, filepath.Join(e.dir, "keys"), e.clk), e.db, e.clk)
	if got, err := again.Refresh(ctx, p0.RefreshToken); err != nil || got != p1 {
		t.Fatalf("retry after a restart: %v, same pair %v", err, got == p1)
	}

	off := newServiceCfg(t, openKeyring(t, filepath.Join(e.dir, "keys"), e.clk), e.db,
		Config{Issuer: "edge-test", Now: e.clk.Now, RefreshReuseGrace: -1})
	q0 := issue(t, off, "o")
	if _, err := off.Refresh(ctx, q0.RefreshToken); err != nil {
		t.Fatal(err)
	}
	if _, err := off.Refresh(ctx, q0.RefreshToken); !errors.Is(err, ErrRefreshReused) {
		t.Fatalf("grace disabled, immediate reuse: %v, want ErrRefreshReused", err)
	}
}
