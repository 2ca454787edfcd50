package federation_test

import (
	"context"
	"errors"
	"net/http"
	"testing"

	"github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Sessions: access tokens survived refresh-reuse revocation for up to 15
// minutes — at a joined edge until the revocation arrived with the next
// pull. When the cloud answers a refresh through this edge with "reused"
// or "revoked", the edge refuses the session's access tokens at once (also
// from its API's verified-token cache, through Revoked), and other
// sessions are untouched. A forged refresh token cannot end a session.
func TestSecurityCloudRevokedSessionRefusedHereAtOnce(t *testing.T) {
	for _, msg := range []string{wire.MsgRefreshReused, wire.MsgRefreshRevoked} {
		t.Run(msg, func(t *testing.T) {
			e := newEnv(t)
			ctx := context.Background()
			victim, _, err := e.cloudKey.Issue(ctx, "o-phone")
			if err != nil {
				t.Fatal(err)
			}
			bystander, _, err := e.cloudKey.Issue(ctx, "o-phone")
			if err != nil {
				t.Fatal(err)
			}
			fc := newFakeCloud(t)
			fc.refresh.Store(&reply{status: http.StatusUnauthorized, message: msg})
			id := e.identity(t, fc.srv.URL, nil, nil)
			claims, err := id.Verify(victim.AccessToken)
			if err != nil {
				t.Fatalf("live cloud session: %v", err)
			}
			// A forged refresh token naming the victim's session does nothing.
			if _, err := id.Refresh(ctx, victim.RefreshToken[:len(victim.RefreshToken)-4]+"AAAA"); err == nil {
				t.Fatal("forged refresh token accepted")
			}
			if _, err := id.Verify(victim.AccessToken); err != nil {
				t.Fatalf("a forged refresh token ended the session: %v", err)
			}
			if _, err := id.Refresh(ctx, victim.RefreshToken); !errors.Is(err, auth.ErrRefreshReused) && !errors.Is(err, auth.ErrRefreshRevoked) {
				t.Fatalf("refresh: %v, want the cloud's refusal", err)
			}
			if _, err := id.Verify(victim.AccessToken); !errors.Is(err, auth.ErrInvalidToken) {
				t.Fatalf("access token of the session the cloud revoked: %v, want ErrInvalidToken", err)
			}
			if !id.Revoked(claims) {
				t.Fatal("Revoked (asked for tokens served from the API's cache) does not know the revocation")
			}
			if _, err := id.Verify(bystander.AccessToken); err != nil {
				t.Fatalf("another session of the user: %v", err)
			}
		})
	}
}
