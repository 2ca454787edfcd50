// Package api is the edge's HTTP API for mini-program clients, on Fiber: the
// response envelope, authentication of bearer tokens, authorisation of every
// request by policy, hardening (request ids, panic recovery, rate limits,
// body limits, timeouts, security headers) and the device, reading and
// state endpoints. Handlers translate between HTTP and the store; they hold
// no storage logic.
package api

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/middleware/recover"
	"github.com/gofiber/fiber/v2/middleware/requestid"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/valyala/fasthttp"
	"github.com/valyala/fasthttp/fasthttpadaptor"

	"github.com/outpost-edge/outpost/pkg/httpenv"
	"github.com/outpost-edge/outpost/pkg/httpguard"
	"github.com/outpost-edge/outpost/pkg/obs"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Config configures the API.
type Config struct {
	EdgeID    string
	Region    string
	Location  *Location // nil when unknown
	Advertise string    // URL at which phones reach this edge
	// Admins hold the admin role on this edge whatever the synced roles say.
	Admins []string
	// DevLogin answers login codes "dev:<openid>" locally. Development only.
	DevLogin bool

	// BodyLimit bounds request bodies (login and refresh: the smaller of
	// it and wire.MaxAuthRequestBytes), checked before the body is read.
	BodyLimit    int           // bytes; default 64 KiB
	ReadTimeout  time.Duration // default 10 s
	WriteTimeout time.Duration // default 10 s
	IdleTimeout  time.Duration // default 60 s
	MaxPage      int           // largest page size; default 1000

	// TrustedProxies (IPs or CIDRs) are the peers whose X-Forwarded-For
	// names the client (pkg/httpguard); empty: the peer is the client.
	TrustedProxies []string
	// MaxConns and MaxConnsPerIP cap the open connections, in total and
	// from one address (trusted proxies exempt). Defaults 4096 and 512.
	MaxConns      int
	MaxConnsPerIP int

	// Rate limits in requests per second with a burst of twice that; 0
	// disables. PerIP guards login and refresh too; PerUser applies after
	// authentication.
	RateLimitPerIP   float64
	RateLimitPerUser float64

	// VerifyCacheTTL is how long a verified access token is remembered, so
	// repeated requests with it skip signature verification; it also bounds
	// how long a token keeps working here after its signing key stops being
	// trusted. Default 30 s; negative disables the cache.
	VerifyCacheTTL time.Duration

	// UserCacheTTL is how long a user's roles and regions are cached between
	// store reads. Role writes through this API apply at once; writes that
	// reach the store otherwise (sync) apply within it. Default 1 s;
	// negative disables the cache.
	UserCacheTTL time.Duration

	// OnlineWindow is how recently a device must have been seen to count
	// as online when there is no Presence (an external broker, whose
	// connections the edge cannot see). Default 5 min.
	OnlineWindow time.Duration

	// Now is the clock for cache expiry; default time.Now.
	Now func() time.Time

	// BypassPolicy skips the policy check after authentication. It exists
	// only for the API benchmark's baseline; never enable it in production.
	BypassPolicy bool

	Logger *slog.Logger
}

func (c *Config) defaults() {
	if c.BodyLimit <= 0 {
		c.BodyLimit = wire.MaxRequestBytes
	}
	if c.ReadTimeout <= 0 {
		c.ReadTimeout = 10 * time.Second
	}
	if c.WriteTimeout <= 0 {
		c.WriteTimeout = 10 * time.Second
	}
	if c.IdleTimeout <= 0 {
		c.IdleTimeout = 60 * time.Second
	}
	if c.MaxPage <= 0 {
		c.MaxPage = 1000
	}
	if c.MaxConns <= 0 {
		c.MaxConns = 4096
	}
	if c.MaxConnsPerIP <= 0 {
		c.MaxConnsPerIP = 512
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.VerifyCacheTTL == 0 {
		c.VerifyCacheTTL = 30 * time.Second
	}
	if c.UserCacheTTL == 0 {
		c.UserCacheTTL = time.Second
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.OnlineWindow <= 0 {
		c.OnlineWindow = 5 * time.Minute
	}
}

// Location is a point in degrees (the wire type: the edge's own location is
// a directory entry's too).
type Location = wire.Location

// Server is the HTTP API.
type Server struct {
	cfg   Config
	deps  Deps
	app   *fiber.App
	guard *httpguard.Guard
	log   *slog.Logger
	m     *obs.HTTPMetrics

	ipLimit, userLimit *limiter

	lnMu     sync.Mutex // guards ln and shut against Serve racing Shutdown
	ln       net.Listener
	shut     bool
	verified *tokenCache
	users    *userCache
	wsWrite  sync.Pool // /mqtt WebSockets' write buffers, held only while writing (live.go)
}

// New builds the API. Call Serve to accept connections.
func New(cfg Config, deps Deps) (*Server, error) {
	cfg.defaults()
	if err := deps.check(); err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, deps: deps, log: cfg.Logger}
	s.m = obs.NewHTTPMetrics(deps.Registerer)
	s.ipLimit = newLimiter(cfg.RateLimitPerIP)
	s.userLimit = newLimiter(cfg.RateLimitPerUser)
	s.verified = newTokenCache(cfg.VerifyCacheTTL, 10000, cfg.Now)
	s.users = newUserCache(cfg.UserCacheTTL, 10000, cfg.Now)
	guard, err := httpguard.New(httpguard.Config{
		BodyLimit: s.bodyLimit, TrustedProxies: cfg.TrustedProxies,
		MaxConns: cfg.MaxConns, MaxConnsPerIP: cfg.MaxConnsPerIP,
		Registerer: deps.Registerer, Logger: cfg.Logger,
	})
	if err != nil {
		return nil, fmt.Errorf("api: %w", err)
	}
	s.guard = guard
	s.app = guard.App(fiber.Config{
		AppName:               "outpost-edge",
		DisableStartupMessage: true,
		BodyLimit:             cfg.BodyLimit,
		ReadTimeout:           cfg.ReadTimeout,
		WriteTimeout:          cfg.WriteTimeout,
		IdleTimeout:           cfg.IdleTimeout,
		ErrorHandler:          s.errorHandler,
		// Parse JSON strictly ourselves; never echo internals.
	})
	s.routes()
	return s, nil
}

// App exposes the Fiber app, for tests that call app.Test.
func (s *Server) App() *fiber.App { return s.app }

// Serve accepts connections on ln until Shutdown. Accept errors (a full
// descriptor table) are retried, never returned, and connections beyond
// the caps are refused (pkg/httpguard).
func (s *Server) Serve(ln net.Listener) error {
	s.lnMu.Lock()
	if s.shut {
		s.lnMu.Unlock()
		ln.Close()
		return nil
	}
	ln = s.guard.Listener(ln)
	s.ln = ln
	s.lnMu.Unlock()
	if err := s.app.Listener(ln); err != nil {
		s.lnMu.Lock()
		shut := s.shut
		s.lnMu.Unlock()
		if shut {
			return nil // the listener was closed by Shutdown
		}
		return fmt.Errorf("http serve: %w", err)
	}
	return nil
}

// Shutdown stops accepting connections and waits for in-flight requests
// until ctx expires.
func (s *Server) Shutdown(ctx context.Context) error {
	s.lnMu.Lock()
	s.shut = true
	ln := s.ln
	s.lnMu.Unlock()
	err := s.app.ShutdownWithContext(ctx)
	if ln != nil {
		// fasthttp's shutdown is a no-op if Serve has not registered the
		// listener yet, leaving Serve to accept forever; closing it here
		// covers that window.
		ln.Close()
	}
	if err != nil {
		return fmt.Errorf("http shutdown: %w", err)
	}
	return nil
}

// Run sweeps idle rate-limit state until ctx ends.
func (s *Server) Run(ctx context.Context) {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.ipLimit.sweep(5 * time.Minute)
			s.userLimit.sweep(5 * time.Minute)
		}
	}
}

// bodyLimit is each request's body limit, decided from its header
// (pkg/httpguard): login and refresh are read before anyone is
// authenticated and take only a code or a token.
func (s *Server) bodyLimit(_, path []byte, _ *fasthttp.RequestHeader) int {
	if httpguard.Route(path, "/api/v1/auth/login") || httpguard.Route(path, "/api/v1/auth/refresh") {
		return min(wire.MaxAuthRequestBytes, s.cfg.BodyLimit)
	}
	return s.cfg.BodyLimit
}

func (s *Server) routes() {
	app := s.app
	app.Use(requestid.New(requestid.Config{ContextKey: "requestid"}))
	app.Use(s.securityHeaders)
	app.Use(s.accessLog)
	// Inside the access log, so a panic is logged and counted as the 500 it
	// becomes rather than bypassing the request metrics.
	app.Use(recover.New())
	// Cache-Control, ETag and 304, gzip (cache.go): after the handler,
	// before the access log measures the status.
	app.Use(conditional)

	app.Get("/healthz", s.healthz)
	app.Get("/readyz", s.readyz)
	metrics := fasthttpadaptor.NewFastHTTPHandler(promhttp.HandlerFor(s.deps.Gatherer, promhttp.HandlerOpts{}))
	app.Get("/metrics", func(c *fiber.Ctx) error { metrics(c.Context()); return nil })

	// MQTT over WebSocket (live.go); the token is checked in CONNECT.
	app.Get("/mqtt", s.limitIP, s.mqttWS)

	v1 := app.Group("/api/v1", s.limitIP)
	v1.Post("/auth/login", s.login)
	v1.Post("/auth/refresh", s.refresh)
	v1.Get("/openapi.json", s.openapi)

	authed := v1.Group("", s.authenticate, s.limitUser)
	authed.Get("/devices", s.listDevices)
	authed.Get("/devices/:id", s.getDevice)
	authed.Get("/devices/:id/readings", s.readings)
	authed.Get("/devices/:id/latest", s.latest)
	authed.Get("/devices/:id/stats", s.stats)
	authed.Put("/devices/:id/desired", s.putDesired)
	authed.Put("/devices/:id/meta", s.putMeta)
	authed.Put("/users/:openid", s.putUser)
	authed.Get("/edge", s.edge)
	authed.Get("/edges/nearest", s.nearest)
	authed.Get("/rules", s.listRules)
	authed.Put("/rules/:name", s.putRule)
	authed.Delete("/rules/:name", s.deleteRule)
	authed.Get("/alerts", s.listAlerts)
	authed.Post("/alerts/:id/ack", s.ackAlert)

	app.Use(func(c *fiber.Ctx) error {
		return fail(c, fiber.StatusNotFound, "no such endpoint: "+c.Method()+" "+c.Path())
	})
}

// Every response body is the envelope pkg/httpenv writes, as the cloud's.
func ok(c *fiber.Ctx, data any) error { return httpenv.OK(c, data) }

func fail(c *fiber.Ctx, status int, msg string) error { return httpenv.Fail(c, status, msg) }

// failRule answers a refusal by the shared rules (pkg/wire) with the status
// the cloud gives it too.
func failRule(c *fiber.Ctx, err error) error {
	st := httpenv.Status(err)
	if st == 0 {
		return err
	}
	return fail(c, st, err.Error())
}

// errorHandler renders errors that escape handlers: Fiber's own (404, 405,
// 413, timeouts) with their status, anything else as a 500 whose body says
// nothing about internals; the details go to the log with the request id.
func (s *Server) errorHandler(c *fiber.Ctx, err error) error {
	var fe *fiber.Error
	if errors.As(err, &fe) {
		msg := fe.Message
		switch fe.Code {
		case fiber.StatusRequestEntityTooLarge:
			msg = wire.BodyTooLarge(s.cfg.BodyLimit).Error()
		case fiber.StatusInternalServerError:
			msg = "internal error"
		}
		return fail(c, fe.Code, msg)
	}
	s.log.Error("request failed", "request_id", c.Locals("requestid"), "method", c.Method(), "path", c.Path(), "err", err)
	return fail(c, fiber.StatusInternalServerError, "internal error; request id "+fmt.Sprint(c.Locals("requestid")))
}

func (s *Server) securityHeaders(c *fiber.Ctx) error {
	c.Set("X-Content-Type-Options", "nosniff")
	c.Set("X-Frame-Options", "DENY")
	c.Set("Referrer-Policy", "no-referrer")
	c.Set("Cache-Control", cacheNoStore) // until conditional says otherwise
	c.Set("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
	c.Set("Strict-Transport-Security", "max-age=31536000")
	return c.Next()
}

// accessLog measures every request (obs.HTTPMetrics) and logs it at debug
// level, or at error level when it failed.
func (s *Server) accessLog(c *fiber.Ctx) error {
	status, elapsed := s.m.Serve(c)
	if s.log.Enabled(c.UserContext(), slog.LevelDebug) || status >= 500 {
		lvl := slog.LevelDebug
		if status >= 500 {
			lvl = slog.LevelError
		}
		s.log.Log(c.UserContext(), lvl, "http",
			"request_id", c.Locals("requestid"), "method", c.Method(), "path", c.Path(),
			"status", status, "ms", float64(elapsed.Microseconds())/1000, "ip", c.IP(),
			"user", c.Locals(localOpenID))
	}
	return nil
}

func (s *Server) healthz(c *fiber.Ctx) error {
	return ok(c, fiber.Map{"status": "ok"})
}

func (s *Server) readyz(c *fiber.Ctx) error {
	if s.deps.Ready != nil {
		if reason := s.deps.Ready(); reason != "" {
			return fail(c, fiber.StatusServiceUnavailable, "degraded: "+reason)
		}
	}
	return ok(c, fiber.Map{"status": "ready"})
}

func retryAfter(c *fiber.Ctx, d time.Duration) {
	secs := int(d.Seconds() + 0.999)
	if secs < 1 {
		secs = 1
	}
	c.Set(fiber.HeaderRetryAfter, strconv.Itoa(secs))
}
