package service

import (
	"context"
	"errors"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	uauth "github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/cloud/auth"
)

// TestRefreshReuseGrace: the cloud's sessions (what a joined edge forwards
// refreshes to) follow the edge's rule: a retry with the same token within
// the grace, while its successor is unused, gets the identical pair and the
// session lives on; a retry after the grace, a reuse of an older token, or
// a retry after the successor was used revokes the session.
func TestRefreshReuseGrace(t *testing.T) {
	var off atomic.Int64
	now := func() time.Time { return time.Now().Add(time.Duration(off.Load())) }
	grace := 30 * time.Second
	n := startService(t, Config{WeChat: fakeWeChat(t), RefreshReuseGrace: grace, Now: now})
	ctx := context.Background()
	type step struct {
		advance time.Duration
		present int // index of the pair whose refresh token is presented
	}
	cases := []struct {
		name   string
		steps  []step // after pairs[0] (login) → pairs[1] (first refresh)
		replay bool
	}{
		{"retry at once", []step{{0, 0}}, true},
		{"retry late in the grace", []step{{grace - 2*time.Second, 0}}, true},
		{"two retries", []step{{time.Second, 0}, {time.Second, 0}}, true},
		{"retry after the grace", []step{{grace + 2*time.Second, 0}}, false},
		{"reuse of an older token", []step{{time.Second, 1}, {time.Second, 2}, {0, 1}}, false},
		{"retry after the successor was used", []step{{time.Second, 1}, {0, 0}}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p0, err := n.svc.Login(ctx, "ok-dora")
			if err != nil {
				t.Fatal(err)
			}
			p1, err := n.svc.Refresh(ctx, p0.RefreshToken)
			if err != nil {
				t.Fatal(err)
			}
			pairs := []uauth.Pair{p0, p1}
			var last uauth.Pair
			for i, st := range tc.steps {
				off.Add(int64(st.advance))
				last, err = n.svc.Refresh(ctx, pairs[st.present].RefreshToken)
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
					t.Fatalf("reuse: %v; want ErrRefreshReused", err)
				}
				for i, p := range pairs {
					if _, err := n.svc.Authenticate(ctx, p.AccessToken); !errors.Is(err, auth.ErrUnauthenticated) {
						t.Errorf("access token %d of the revoked session: %v", i, err)
					}
				}
				if _, err := n.svc.Refresh(ctx, pairs[len(pairs)-1].RefreshToken); !errors.Is(err, ErrRefreshRevoked) {
					t.Errorf("newest refresh token after the reuse: %v, want ErrRefreshRevoked", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("retry within the grace: %v", err)
			}
			if last != p1 {
				t.Fatalf("retry got another pair:\n%+v\nwant\n%+v", last, p1)
			}
			if _, err := n.svc.Authenticate(ctx, last.AccessToken); err != nil {
				t.Fatalf("the retried pair's access token: %v", err)
			}
			if _, err := n.svc.Refresh(ctx, last.RefreshToken); err != nil {
				t.Fatalf("refresh after the retry: %v", err)
			}
		})
	}
}
