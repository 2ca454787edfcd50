// Package federation is the login and token service of an edge joined to a
// cloud. Logins and refreshes of cloud sessions are forwarded to the cloud,
// which signs with the deployment key every edge trusts, so a phone that
// logged in at one edge is accepted at any other, offline too. The edge's
// API consumes an Identity through its Login and Tokens interfaces.
//
// Sessions while the cloud is unreachable: access tokens keep verifying
// locally until they expire (the cloud's access TTL, 1h by default). A
// cloud-signed refresh token presented to an edge that cannot reach the
// cloud is checked offline against the trusted deployment key; if valid, the
// edge returns a fresh access token signed with its own key (accepted at
// this edge; other edges do not trust edge keys) and hands the same refresh
// token back, to be rotated by the cloud once it is reachable again. Dev
// login stays local: signed with this edge's own key.
//
// A login the cloud cannot take (unreachable, or unable to reach WeChat
// itself) falls back to the edge's own WeChat login when it has one, and
// otherwise fails with auth.ErrLoginUnavailable.
//
// Revocation: the cloud rotates refresh tokens with reuse detection and lets
// an admin end a user's sessions; the revocations reach the edge through
// sync (the syncer's Revocations, consumed here as a Revoker). Offline
// refresh and access-token verification refuse sessions revoked as of the
// last pull. A refresh the cloud refuses as reused or revoked ends the
// session's access tokens here at once, without waiting for that pull.
package federation

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/cloud/client"
	"github.com/outpost-edge/outpost/pkg/wechat"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// DefaultTimeout bounds one call to the cloud.
const DefaultTimeout = 5 * time.Second

// Cloud is the cloud's HTTP API (a *client.Client). Errors it returns are
// classified with client.APIError and client.ThrottledError; any other
// error means the cloud could not be reached.
type Cloud interface {
	Call(ctx context.Context, method, path string, in, out any) error
}

// Login exchanges a mini-program login code for a token pair (the edge's
// own WeChat login, used when the cloud is unreachable).
type Login interface {
	Login(ctx context.Context, code string) (auth.Pair, error)
}

// Revoker reports whether the cloud revoked the session of a verified
// token, as of the last pull.
type Revoker interface {
	Revoked(c auth.Claims) bool
}

// Config configures an Identity.
type Config struct {
	// Local issues and verifies this edge's own tokens and holds the
	// deployment keys it trusts. Required.
	Local *auth.Service
	// Cloud receives logins and refreshes. Required.
	Cloud Cloud
	// Fallback logs users in when the cloud is unreachable; nil means no
	// fallback (logins fail with auth.ErrLoginUnavailable).
	Fallback Login
	// Revocations refuses sessions the cloud revoked; nil refuses nothing.
	Revocations Revoker
	// Timeout bounds one call to the cloud; default DefaultTimeout.
	Timeout time.Duration
	Logger  *slog.Logger
}

// Identity is a joined edge's login and token service. It is safe for
// concurrent use.
type Identity struct {
	cfg     Config
	log     *slog.Logger
	offline *auth.RefreshVerifier
}

// New builds the identity service of a joined edge.
func New(cfg Config) (*Identity, error) {
	if cfg.Local == nil || cfg.Cloud == nil {
		return nil, errors.New("federation: local token service and cloud are required")
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Identity{cfg: cfg, log: cfg.Logger,
		offline: auth.NewRefreshVerifier(cfg.Local.Keys(), auth.DefaultLeeway, nil)}, nil
}

// Issue starts a local session (dev login).
func (i *Identity) Issue(ctx context.Context, openid string) (auth.Pair, error) {
	return i.cfg.Local.Issue(ctx, openid)
}

// Verify checks an access token against this edge's own and trusted keys,
// and refuses one whose session the cloud revoked (as of the last pull).
func (i *Identity) Verify(token string) (auth.Claims, error) {
	c, err := i.cfg.Local.Verify(token)
	if err != nil {
		return c, err
	}
	if i.Revoked(c) {
		return auth.Claims{}, fmt.Errorf("%w: the session was revoked", auth.ErrInvalidToken)
	}
	return c, nil
}

// Revoked reports whether the session of an already verified token was
// revoked: by the cloud as of the last pull, or here (a local session, or a
// cloud session whose refresh the cloud just refused as reused or revoked).
// It is cheap: the API asks it on every request.
func (i *Identity) Revoked(c auth.Claims) bool {
	return i.cfg.Local.Revoked(c) || (i.cfg.Revocations != nil && i.cfg.Revocations.Revoked(c))
}

// Login forwards a login code to the cloud. The cloud's refusals map to
// the wechat sentinels (invalid code, blocked, rate limited); when the cloud
// cannot be reached the fallback login is tried, if any.
func (i *Identity) Login(ctx context.Context, code string) (auth.Pair, error) {
	ctx, cancel := context.WithTimeout(ctx, i.cfg.Timeout)
	defer cancel()
	var pair auth.Pair
	err := i.cfg.Cloud.Call(ctx, http.MethodPost, wire.PathLogin, map[string]string{"code": code}, &pair)
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
	i.log.Warn("login: cloud unreachable", "err", err)
	if i.cfg.Fallback != nil {
		// The fallback gets its own time, not what the cloud call left.
		return i.cfg.Fallback.Login(context.WithoutCancel(ctx), code)
	}
	return auth.Pair{}, fmt.Errorf("%w: %v", auth.ErrLoginUnavailable, err)
}

// Refresh rotates a session: cloud-signed refresh tokens at the cloud (or,
// when it is unreachable, offline as the package comment describes); local
// ones locally.
func (i *Identity) Refresh(ctx context.Context, token string) (auth.Pair, error) {
	if !auth.IsSignedRefresh(token) {
		return i.cfg.Local.Refresh(ctx, token)
	}
	cctx, cancel := context.WithTimeout(ctx, i.cfg.Timeout)
	defer cancel()
	var pair auth.Pair
	err := i.cfg.Cloud.Call(cctx, http.MethodPost, wire.PathRefresh, map[string]string{"refresh_token": token}, &pair)
	if err == nil {
		return pair, nil
	}
	var apiErr *client.APIError
	if errors.As(err, &apiErr) && apiErr.Status == http.StatusUnauthorized {
		refused := refreshRefused(apiErr.Message)
		if errors.Is(refused, auth.ErrRefreshReused) || errors.Is(refused, auth.ErrRefreshRevoked) {
			i.revokeHere(token)
		}
		return auth.Pair{}, refused
	}
	if errors.As(err, &apiErr) && apiErr.Status < 500 {
		return auth.Pair{}, err
	}
	claims, verr := i.offline.Verify(token)
	if verr != nil {
		return auth.Pair{}, verr
	}
	if i.Revoked(claims) {
		i.log.Info("refused an offline refresh of a session the cloud revoked", "openid", claims.OpenID)
		return auth.Pair{}, fmt.Errorf("%w: revoked by the cloud", auth.ErrRefreshRevoked)
	}
	access, ttl, serr := i.cfg.Local.AccessOnly(claims.OpenID, claims.Family)
	if serr != nil {
		return auth.Pair{}, serr
	}
	i.log.Info("refreshed a cloud session offline with this edge's key", "openid", claims.OpenID)
	return auth.Pair{AccessToken: access, RefreshToken: token, ExpiresIn: ttl, OpenID: claims.OpenID}, nil
}

// revokeHere refuses, from now on, the access tokens of the session a
// refresh token the cloud called reused or revoked belongs to, rather than
// until the revocation arrives with the next pull (a joined edge's access
// tokens live the cloud's access TTL). The token's signature is checked
// first, so a forged one cannot end someone else's session.
func (i *Identity) revokeHere(token string) {
	claims, err := i.offline.Verify(token)
	if err != nil && errors.Is(err, auth.ErrRefreshExpired) {
		return // nothing of the session can still be valid
	}
	if err != nil || claims.Family == "" {
		return
	}
	if err := i.cfg.Local.RevokeSession(claims.Family, claims.ExpiresAt.Add(auth.DefaultLeeway)); err != nil {
		i.log.Warn("could not record a session the cloud revoked", "openid", claims.OpenID, "err", err)
		return
	}
	i.log.Info("session revoked by the cloud; its access tokens are refused here", "openid", claims.OpenID)
}

// refreshRefused maps the cloud's 401 answer to a refresh back to the
// sentinel the edge API words the same way.
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
