package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/utils"

	"github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/ident"
	"github.com/outpost-edge/outpost/pkg/policy"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/wechat"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Locals keys.
const (
	localOpenID = "openid"
	localUser   = "user"
	localToken  = "access_token"
)

// WeChatLogin logs users in with WeChat code2session and issues local tokens.
type WeChatLogin struct {
	Client *wechat.Client
	Tokens Tokens
}

// Login exchanges a mini-program code for a token pair.
func (l WeChatLogin) Login(ctx context.Context, code string) (auth.Pair, error) {
	sess, err := l.Client.Code2Session(ctx, code)
	if err != nil {
		return auth.Pair{}, err
	}
	return l.Tokens.Issue(ctx, sess.OpenID)
}

// decodeBody parses a JSON body strictly, so that a typo in a field name is a
// clear 400 rather than a silently ignored field.
func decodeBody(c *fiber.Ctx, v any) error {
	body := c.Body()
	if len(bytes.TrimSpace(body)) == 0 {
		return errors.New("request body is empty; expected a JSON object")
	}
	// The shared JSON rules (depth, UTF-8, finite numbers) before decoding:
	// encoding/json would replace invalid UTF-8 silently and keep 1e400 in
	// a raw value, which would then be served back. Grammar errors are left
	// to the decoder, which words them for the client.
	checked := wire.CheckJSON(body, wire.MaxJSONDepth)
	if checked != nil && !errors.Is(checked, wire.ErrJSONSyntax) {
		return fmt.Errorf("request body refused: %v", checked)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var se *json.SyntaxError
		var te *json.UnmarshalTypeError
		switch {
		case errors.As(err, &se):
			return fmt.Errorf("request body is not valid JSON (at byte %d)", se.Offset)
		case errors.Is(err, io.ErrUnexpectedEOF):
			return errors.New("request body is not valid JSON (it ends in the middle of a value)")
		case errors.As(err, &te) && te.Field == "":
			return fmt.Errorf("request body must be a JSON object, not %s", te.Value)
		case errors.As(err, &te):
			return fmt.Errorf("field %q must be %s, not %s", te.Field, jsonKind(te.Type.Kind().String()), te.Value)
		case strings.HasPrefix(err.Error(), "json: unknown field"):
			return fmt.Errorf("unknown field %s", strings.TrimPrefix(err.Error(), "json: unknown field "))
		}
		return errors.New("request body is not a valid JSON object")
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("request body has trailing data after the JSON object")
	}
	if checked != nil { // the decoder took what the grammar refuses
		return fmt.Errorf("request body is not valid JSON: %v", checked)
	}
	return nil
}

func jsonKind(k string) string {
	switch k {
	case "string":
		return "a string"
	case "map", "struct":
		return "an object"
	case "slice":
		return "an array"
	case "bool":
		return "true or false"
	}
	return "a number"
}

type loginRequest struct {
	Code string `json:"code"`
}

func (s *Server) login(c *fiber.Ctx) error {
	var req loginRequest
	if err := decodeBody(c, &req); err != nil {
		return fail(c, fiber.StatusBadRequest, err.Error())
	}
	if req.Code == "" {
		return fail(c, fiber.StatusBadRequest, `"code" is required: the code from wx.login()`)
	}
	if len(req.Code) > 512 {
		return fail(c, fiber.StatusBadRequest, `"code" is too long: at most 512 bytes`)
	}
	ctx := c.UserContext()
	if openid, isDev := strings.CutPrefix(req.Code, "dev:"); isDev {
		if !s.cfg.DevLogin {
			return fail(c, fiber.StatusBadRequest, "dev login is disabled on this edge (start it with -dev-login for development)")
		}
		if !ident.OpenID(openid) {
			return fail(c, fiber.StatusBadRequest, "dev login openid must be 1 to 128 printable characters without '/', '\\', '%' or '..'")
		}
		pair, err := s.deps.Tokens.Issue(ctx, openid)
		if err != nil {
			return err
		}
		return ok(c, pair)
	}
	if s.deps.Login == nil {
		return fail(c, fiber.StatusServiceUnavailable, "login unavailable: this edge has neither WeChat credentials nor a cloud to log in through")
	}
	pair, err := s.deps.Login.Login(ctx, req.Code)
	switch {
	case err == nil:
		return ok(c, pair)
	case errors.Is(err, wechat.ErrInvalidCode):
		return fail(c, fiber.StatusBadRequest, "invalid or expired login code: call wx.login() again")
	case errors.Is(err, wechat.ErrRateLimited):
		retryAfter(c, 5*time.Second)
		return fail(c, fiber.StatusTooManyRequests, "WeChat is rate limiting logins; retry shortly")
	case errors.Is(err, wechat.ErrBlocked):
		return fail(c, fiber.StatusForbidden, "this WeChat user is blocked from logging in")
	case errors.Is(err, wechat.ErrBusy):
		retryAfter(c, 2*time.Second)
		return fail(c, fiber.StatusServiceUnavailable, "WeChat is busy; retry shortly")
	case errors.Is(err, wechat.ErrUnavailable), errors.Is(err, auth.ErrLoginUnavailable):
		retryAfter(c, 30*time.Second)
		return fail(c, fiber.StatusServiceUnavailable, "login unavailable: neither the cloud nor WeChat can be reached; existing sessions keep working")
	}
	s.log.Error("login failed", "request_id", c.Locals("requestid"), "err", err)
	return fail(c, fiber.StatusBadGateway, "login failed upstream; retry later")
}

type refreshRequest struct {
	RefreshToken string `json:"refresh_token"`
}

func (s *Server) refresh(c *fiber.Ctx) error {
	var req refreshRequest
	if err := decodeBody(c, &req); err != nil {
		return fail(c, fiber.StatusBadRequest, err.Error())
	}
	if req.RefreshToken == "" {
		return fail(c, fiber.StatusBadRequest, `"refresh_token" is required`)
	}
	if len(req.RefreshToken) > 512 {
		return fail(c, fiber.StatusBadRequest, `"refresh_token" is too long: at most 512 bytes`)
	}
	pair, err := s.deps.Tokens.Refresh(c.UserContext(), req.RefreshToken)
	switch {
	case err == nil:
		return ok(c, pair)
	case errors.Is(err, auth.ErrRefreshReused):
		return fail(c, fiber.StatusUnauthorized, "refresh token was already used: the session is revoked, log in again")
	case errors.Is(err, auth.ErrRefreshExpired):
		return fail(c, fiber.StatusUnauthorized, "refresh token expired: log in again")
	case errors.Is(err, auth.ErrRefreshRevoked):
		return fail(c, fiber.StatusUnauthorized, "refresh token revoked: log in again")
	case errors.Is(err, auth.ErrRefreshNotFound):
		return fail(c, fiber.StatusUnauthorized, "unknown refresh token: log in again")
	}
	return err
}

// authenticate verifies the bearer token and loads the caller's roles.
func (s *Server) authenticate(c *fiber.Ctx) error {
	h := c.Get(fiber.HeaderAuthorization)
	tok, found := strings.CutPrefix(h, "Bearer ")
	if !found || tok == "" {
		c.Set(fiber.HeaderWWWAuthenticate, `Bearer realm="outpost"`)
		return fail(c, fiber.StatusUnauthorized, "missing access token: send Authorization: Bearer <access_token> from /api/v1/auth/login")
	}
	claims, cached := s.verified.get(tok)
	var err error
	if !cached {
		if claims, err = s.deps.Tokens.Verify(tok); err == nil {
			s.verified.put(tok, claims)
		}
	} else if rc, ok := s.deps.Tokens.(RevocationChecker); ok && rc.Revoked(claims) {
		err = fmt.Errorf("%w: the session was revoked", auth.ErrInvalidToken)
	}
	if err != nil {
		c.Set(fiber.HeaderWWWAuthenticate, `Bearer realm="outpost", error="invalid_token"`)
		switch {
		case errors.Is(err, auth.ErrTokenExpired):
			return fail(c, fiber.StatusUnauthorized, "access token expired: refresh it with /api/v1/auth/refresh")
		case errors.Is(err, auth.ErrUnknownKey):
			return fail(c, fiber.StatusUnauthorized, "access token signed by a key this edge does not trust: log in again")
		}
		return fail(c, fiber.StatusUnauthorized, "invalid access token: log in again")
	}
	u := policy.User{OpenID: claims.OpenID}
	if cu, ok := s.users.get(claims.OpenID); ok {
		u.Roles, u.Regions = cu.roles, cu.regions
	} else {
		if u.Roles, u.Regions, err = s.loadUser(claims.OpenID); err != nil {
			return err
		}
		s.users.put(claims.OpenID, u.Roles, u.Regions)
	}
	c.Locals(localOpenID, claims.OpenID)
	c.Locals(localUser, u)
	c.Locals(localToken, tok)
	return c.Next()
}

// actorOf is the caller as the store records a change's author: the openid
// and the access token presented, which the cloud verifies as the change's
// proof (edge restriction). Copied: the header's bytes belong to fasthttp.
func actorOf(c *fiber.Ctx) store.Actor {
	tok, _ := c.Locals(localToken).(string)
	return store.Actor{OpenID: utils.CopyString(userOf(c).OpenID), Proof: utils.CopyString(tok)}
}

// loadUser reads openid's roles and regions from the store (none for an
// unknown user), adding the admin role if the configuration names openid an
// admin. The slices are never nil and may be cached and shared.
func (s *Server) loadUser(openid string) (roles, regions []string, err error) {
	roles, regions = []string{}, []string{}
	rec, err := s.deps.Store.User(openid)
	switch {
	case err == nil:
		roles, regions = nonNil(rec.Roles), nonNil(rec.Regions)
	case !errors.Is(err, store.ErrNotFound):
		return nil, nil, fmt.Errorf("load user %s: %w", openid, err)
	}
	if slices.Contains(s.cfg.Admins, openid) {
		roles = append(slices.Clip(roles), "admin")
	}
	return roles, regions, nil
}

func userOf(c *fiber.Ctx) policy.User {
	u, _ := c.Locals(localUser).(policy.User)
	return u
}

// errDenied carries a policy denial out of authorize.
type errDenied struct{ reason string }

func (e errDenied) Error() string { return e.reason }

// authorize asks the policy whether the caller may do action on res.
func (s *Server) authorize(c *fiber.Ctx, action string, res policy.Resource) error {
	if s.cfg.BypassPolicy {
		return nil
	}
	d, err := s.deps.Policy.Decide(c.UserContext(), policy.Input{User: userOf(c), Action: action, Resource: res})
	if err != nil {
		return fmt.Errorf("policy decision for %s: %w", action, err)
	}
	if !d.Allow {
		reason := d.Reason
		if reason == "" {
			reason = "not allowed by policy"
		}
		return errDenied{reason: reason}
	}
	return nil
}

// deny renders an authorize error: 403 for a denial, else the error.
func deny(c *fiber.Ctx, err error) error {
	var d errDenied
	if errors.As(err, &d) {
		return fail(c, fiber.StatusForbidden, "forbidden: "+d.reason)
	}
	return err
}
