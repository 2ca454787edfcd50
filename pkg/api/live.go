package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fasthttp/websocket"
	"github.com/gofiber/fiber/v2"
	"github.com/valyala/fasthttp"

	"github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/ident"
	"github.com/outpost-edge/outpost/pkg/policy"
)

// The live feed: MQTT over WebSocket at /mqtt (subprotocol "mqtt", MQTT
// 3.1.1 and 5), on the API's origin so that a mini-program reaches the API
// and the feed through one domain and certificate. This file is the
// transport (the upgrade and a net.Conn over the WebSocket) and the
// verification phones' sessions are decided by (VerifyPhone): the token
// checks of authenticate and the policy's device.read. The MQTT session,
// its ACL and its re-evaluation are pkg/broker's (phone.go).

// Live runs phones' MQTT sessions over WebSocket byte streams (pkg/broker).
type Live interface {
	ServePhone(c net.Conn) error
}

// maxWSMessage bounds one WebSocket message from a phone before it is
// buffered: phones send CONNECT, SUBSCRIBE, UNSUBSCRIBE, PINGREQ and
// DISCONNECT, all small.
const maxWSMessage = 64 << 10

// upgrader accepts /mqtt upgrades offering subprotocol "mqtt".
//
// A session is mostly idle between deliveries, and an edge holds
// thousands: its write buffer comes from a pool shared by every session
// and is held only while a message is written, and its read buffer is
// 1 KiB (what phones send is small; a larger message is read in several
// fills). Each was 4 KiB per session.
func upgrader(pool websocket.BufferPool) *websocket.FastHTTPUpgrader {
	return &websocket.FastHTTPUpgrader{
		Subprotocols:     []string{"mqtt"},
		HandshakeTimeout: 10 * time.Second,
		ReadBufferSize:   1 << 10,
		WriteBufferSize:  4 << 10,
		WriteBufferPool:  pool,
		// Phones authenticate in CONNECT with a bearer token, never with
		// cookies, so a page of another origin gains nothing by opening
		// the socket (no cross-site WebSocket hijacking); mini-programs
		// send no Origin at all.
		CheckOrigin: func(*fasthttp.RequestCtx) bool { return true },
	}
}

func (s *Server) mqttWS(c *fiber.Ctx) error {
	if s.deps.Live == nil {
		return fail(c, fiber.StatusNotFound, "the live feed is not enabled on this edge")
	}
	if !websocket.FastHTTPIsWebSocketUpgrade(c.Context()) {
		c.Set(fiber.HeaderUpgrade, "websocket")
		return fail(c, fiber.StatusUpgradeRequired, "/mqtt is MQTT over WebSocket: connect with a WebSocket client, subprotocol \"mqtt\", password = access token")
	}
	live := s.deps.Live
	err := upgrader(&s.wsWrite).Upgrade(c.Context(), func(ws *websocket.Conn) {
		if ws.Subprotocol() != "mqtt" {
			_ = ws.WriteControl(websocket.CloseMessage,
				websocket.FormatCloseMessage(websocket.CloseProtocolError, `subprotocol "mqtt" required`), time.Now().Add(time.Second))
			_ = ws.Close()
			return
		}
		ws.SetReadLimit(maxWSMessage)
		if err := live.ServePhone(&wsConn{Conn: ws.NetConn(), ws: ws}); err != nil {
			s.log.Debug("live session ended", "remote", ws.RemoteAddr().String(), "err", err)
		}
	})
	if err != nil {
		// The upgrader has written its own 4xx.
		s.log.Debug("websocket upgrade refused", "ip", c.IP(), "err", err)
	}
	return nil
}

// errTextFrame: MQTT over WebSocket travels in binary messages only.
var errTextFrame = errors.New("mqtt over websocket: text message received; MQTT packets travel in binary messages")

// wsConn is a WebSocket as the byte stream mochi reads MQTT from: reads span
// messages, each write is one binary message.
type wsConn struct {
	net.Conn // the hijacked connection: addresses, deadlines, close
	ws       *websocket.Conn
	r        io.Reader // the message being read, or nil
	wmu      sync.Mutex
	wdl      time.Time // the write deadline last set (SetWriteDeadline), guarded by wmu
	closed   atomic.Bool
}

func (c *wsConn) Read(p []byte) (int, error) {
	for {
		if c.r == nil {
			op, r, err := c.ws.NextReader()
			if err != nil {
				return 0, err
			}
			if op != websocket.BinaryMessage {
				return 0, errTextFrame
			}
			c.r = r
		}
		n, err := c.r.Read(p)
		if errors.Is(err, io.EOF) {
			c.r = nil
			if n == 0 {
				continue
			}
			err = nil
		}
		return n, err
	}
}

func (c *wsConn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if err := c.ws.WriteMessage(websocket.BinaryMessage, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteLive writes p as one binary message for the broker's live feed
// (broker.LiveConn): only if no other write is under way (false, nothing
// written, if one is), and within timeout (or the session's own write
// deadline, if sooner). An error may leave a message half written: the
// broker closes the connection then.
func (c *wsConn) WriteLive(p []byte, timeout time.Duration) (bool, error) {
	if !c.wmu.TryLock() {
		return false, nil
	}
	defer c.wmu.Unlock()
	if c.closed.Load() {
		return true, net.ErrClosed
	}
	dl := time.Now().Add(timeout)
	if !c.wdl.IsZero() && c.wdl.Before(dl) {
		dl = c.wdl
	}
	if err := c.ws.SetWriteDeadline(dl); err != nil {
		return true, err
	}
	err := c.ws.WriteMessage(websocket.BinaryMessage, p)
	if derr := c.ws.SetWriteDeadline(c.wdl); err == nil {
		err = derr
	}
	return true, err
}

// Deadlines: the WebSocket keeps its write deadline in a field its writes
// read, so setting it takes the write lock. Once closed, deadlines stay in
// the past.

func (c *wsConn) SetDeadline(t time.Time) error {
	if err := c.SetReadDeadline(t); err != nil {
		return err
	}
	return c.SetWriteDeadline(t)
}

func (c *wsConn) SetReadDeadline(t time.Time) error {
	if c.closed.Load() {
		return net.ErrClosed
	}
	return c.ws.SetReadDeadline(t)
}

func (c *wsConn) SetWriteDeadline(t time.Time) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.closed.Load() {
		return net.ErrClosed
	}
	c.wdl = t
	return c.ws.SetWriteDeadline(t)
}

// Close ends the connection. fasthttp closes a hijacked connection only
// when the handler returns (its Close is a no-op), so Close puts both
// deadlines in the past: the session's blocked read fails, ServePhone
// returns, and with it the handler.
func (c *wsConn) Close() error {
	if c.closed.Swap(true) {
		return nil
	}
	return c.Conn.SetDeadline(time.Unix(1, 0))
}

// PhoneSession is a phone's verified access token, as the broker asks about
// it (broker.PhoneSession).
type PhoneSession struct {
	s      *Server
	claims auth.Claims
}

// VerifyPhone verifies a phone's access token exactly as authenticate
// verifies a bearer token: signature, expiry, trusted key, revocation.
func (s *Server) VerifyPhone(token string) (*PhoneSession, error) {
	if token == "" {
		return nil, fmt.Errorf("%w: no access token in the MQTT password", auth.ErrInvalidToken)
	}
	claims, cached := s.verified.get(token)
	var err error
	if !cached {
		if claims, err = s.deps.Tokens.Verify(token); err != nil {
			return nil, err
		}
		s.verified.put(token, claims)
	}
	p := &PhoneSession{s: s, claims: claims}
	if p.Revoked() {
		return nil, fmt.Errorf("%w: the session was revoked", auth.ErrInvalidToken)
	}
	if !s.cfg.Now().Before(claims.ExpiresAt) {
		return nil, auth.ErrTokenExpired
	}
	return p, nil
}

// OpenID is the token's user.
func (p *PhoneSession) OpenID() string { return p.claims.OpenID }

// ExpiresAt is when the token expires: the broker closes the session then.
func (p *PhoneSession) ExpiresAt() time.Time { return p.claims.ExpiresAt }

// Revoked reports whether the token's session was revoked since it was
// verified.
func (p *PhoneSession) Revoked() bool {
	rc, ok := p.s.deps.Tokens.(RevocationChecker)
	return ok && rc.Revoked(p.claims)
}

// MayRead decides device.read on device for the token's user with the
// user's roles as stored now (not the request cache: the broker caches the
// answer itself and asks again after every change), as GET
// /api/v1/devices/{id} decides it.
func (p *PhoneSession) MayRead(ctx context.Context, device string) (bool, error) {
	s := p.s
	if !ident.DeviceID(device) {
		return false, nil
	}
	if s.cfg.BypassPolicy {
		return true, nil
	}
	u := policy.User{OpenID: p.claims.OpenID}
	var err error
	if u.Roles, u.Regions, err = s.loadUser(p.claims.OpenID); err != nil {
		return false, err
	}
	res, err := s.deviceResource(device)
	if err != nil {
		return false, fmt.Errorf("load device %s: %w", device, err)
	}
	dec, err := s.deps.Policy.Decide(ctx, policy.Input{User: u, Action: actRead, Resource: res})
	if err != nil {
		return false, fmt.Errorf("policy decision for %s: %w", actRead, err)
	}
	return dec.Allow, nil
}
