package syncer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/outpost-edge/outpost/pkg/api"
	"github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/cloud/client"
	"github.com/outpost-edge/outpost/pkg/wechat"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Identity is a joined edge's login and token service (api.Login and
// api.Tokens). Logins go to the cloud, which signs with the deployment key
// that every edge trusts, so a phone that logged in at one edge is accepted
// at any other, offline too.
//
// Sessions while the cloud is unreachable: access tokens keep verifying
// locally until they expire (the cloud's access TTL, 1h by default). A
// cloud-signed refresh token presented to an edge that cannot reach the
// cloud is checked offline against the trusted deployment key; if valid, the
// edge returns a fresh access token signed with its own key (accepted at
// this edge; other edges do not trust edge keys) and hands the same refresh
// token back, to be rotated by the cloud once it is reachable again.
// Dev login stays local: signed with this edge's own key.
//
// Revocation: the cloud rotates refresh tokens with reuse detection and lets
// an admin end a user's sessions; the revocations reach this edge through
// pull (Revoked). Offline refresh and access-token verification refuse
// sessions revoked as of the last pull; see Revocations for the window that
// remains while the edge cannot pull.
type Identity struct {
	Local   *auth.Service
	Client  *client.Client
	WeChat  api.Login // optional local fallback when the cloud is unreachable
	Timeout time.Duration
	Log     *slog.Logger
	// Revocations is the syncer's copy of the cloud's session revocations;
	// nil refuses nothing.
	Revocations *Revocations

	offline *auth.RefreshVerifier
}

var (
	_ api.Login             = (*Identity)(nil)
	_ api.Tokens            = (*Identity)(nil)
	_ api.RevocationChecker = (*Identity)(nil)
)

// NewIdentity builds the identity service of a joined edge.
func NewIdentity(local *auth.Service, cl *client.Client, wc api.Login, log *slog.Logger) *Identity {
	if log == nil {
		log = slog.Default()
	}
	return &Identity{Local: local, Client: cl, WeChat: wc, Timeout: 5 * time.Second, Log: log,
		offline: auth.NewRefreshVerifier(local.Keys(), auth.DefaultLeeway, nil)}
}

// Issue starts a local session (dev login).
func (i *Identity) Issue(ctx context.Context, openid string) (auth.Pair, error) {
	return i.Local.Issue(ctx, openid)
}

// Verify checks an access token against this edge's own and trusted keys,
// and refuses one whose session the cloud revoked (as of the last pull).
func (i *Identity) Verify(token string) (auth.Claims, error) {
	c, err := i.Local.Verify(token)
	if err != nil {
		return c, err
	}
	if i.Revocations.Revoked(c) {
		return auth.Claims{}, fmt.Errorf("%w: the session was revoked", auth.ErrInvalidToken)
	}
	return c, nil
}

// Revoked implements api.RevocationChecker: whether the cloud revoked the
// session of an already verified token, as of the last pull.
func (i *Identity) Revoked(c auth.Claims) bool { return i.Revocations.Revoked(c) }

// Login forwards a login code to the cloud.
func (i *Identity) Login(ctx context.Context, code string) (auth.Pair, error) {
	ctx, cancel := context.WithTimeout(ctx, i.Timeout)
	defer cancel()
	var pair auth.Pair
	err := i.Client.Call(ctx, http.MethodPost, wire.PathLogin, map[string]string{"code": code}, &pair)
	if err == nil {
		return pair, nil
	}
	var apiErr *client.APIError
	var th *client.ThrottledError
	switch {
	case errors.As(err, &th):
		return auth.Pair{}, wechat.ErrRateLimited
	case errors.As(err, &apiErr) && apiErr.Status == http.StatusBadRequest:
		return auth.Pair{}, fmt.Errorf("%w: %s", wechat.ErrInvalidCode, apiErr.Message)
	case errors.As(err, &apiErr) && apiErr.Status == http.StatusForbidden:
		return auth.Pair{}, fmt.Errorf("%w: %s", wechat.ErrBlocked, apiErr.Message)
	case errors.As(err, &apiErr) && apiErr.Status < 500:
		return auth.Pair{}, err
	}
	// The cloud is unreachable (or cannot reach WeChat itself).
	i.Log.Warn("login: cloud unreachable", "err", err)
	if i.WeChat != nil {
		return i.WeChat.Login(context.WithoutCancel(ctx), code)
	}
	return auth.Pair{}, fmt.Errorf("%w: %v", api.ErrLoginUnavailable, err)
}

// Refresh rotates a session: cloud-signed refresh tokens at the cloud (or,
// unreachable, offline as described on Identity); local ones locally.
func (i *Identity) Refresh(ctx context.Context, token string) (auth.Pair, error) {
	if !auth.IsSignedRefresh(token) {
		return i.Local.Refresh(ctx, token)
	}
	cctx, cancel := context.WithTimeout(ctx, i.Timeout)
	defer cancel()
	var pair auth.Pair
	err := i.Client.Call(cctx, http.MethodPost, wire.PathRefresh, map[string]string{"refresh_token": token}, &pair)
	if err == nil {
		return pair, nil
	}
	var apiErr *client.APIError
	if errors.As(err, &apiErr) && apiErr.Status == http.StatusUnauthorized {
		return auth.Pair{}, refreshRefused(apiErr.Message)
	}
	if errors.As(err, &apiErr) && apiErr.Status < 500 {
		return auth.Pair{}, err
	}
	claims, verr := i.offline.Verify(token)
	if verr != nil {
		return auth.Pair{}, verr
	}
	if i.Revocations.Revoked(claims) {
		i.Log.Info("refused an offline refresh of a session the cloud revoked", "openid", claims.OpenID)
		return auth.Pair{}, fmt.Errorf("%w: revoked by the cloud", auth.ErrRefreshRevoked)
	}
	access, ttl, serr := i.Local.AccessOnly(claims.OpenID, claims.Family)
	if serr != nil {
		return auth.Pair{}, serr
	}
	i.Log.Info("refreshed a cloud session offline with this edge's key", "openid", claims.OpenID)
	return auth.Pair{AccessToken: access, RefreshToken: token, ExpiresIn: ttl, OpenID: claims.OpenID}, nil
}

// refreshRefused maps the cloud's 401 answer to a refresh back to the
// error the edge API words the same way.
func refreshRefused(msg string) error {
	switch msg {
	case wire.MsgRefreshReused:
		return auth.ErrRefreshReused
	case wire.MsgRefreshRevoked:
		return auth.ErrRefreshRevoked
	case wire.MsgRefreshExpired:
		return auth.ErrRefreshExpired
	}
	return fmt.Errorf("%w: %s", auth.ErrRefreshNotFound, msg)
}
