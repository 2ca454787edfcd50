// Package httpapi is cloud-sync's HTTP surface (Fiber): the edge-facing sync
// API, the consumer API, cluster membership, and health and metrics. Any node
// takes any request: writes run on the leader, and a follower forwards them
// there itself (never refusing or redirecting the client); reads are served
// from the local replica unless the caller asks for consistency=strong.
//
// Handlers are transport only: they authenticate, decode and check the
// request's shape, call the application layer (package service, behind the
// Service interface), and encode its answer. Statuses come from the
// service's sentinel errors (errors.Is), never from their text.
package httpapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	gojson "github.com/goccy/go-json"
	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/middleware/adaptor"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/valyala/fasthttp"

	"github.com/outpost-edge/outpost/pkg/cloud/auth"
	"github.com/outpost-edge/outpost/pkg/cloud/service"
	"github.com/outpost-edge/outpost/pkg/httpenv"
	"github.com/outpost-edge/outpost/pkg/httpguard"
	"github.com/outpost-edge/outpost/pkg/obs"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Headers used between nodes.
const (
	hdrForwarded = "X-Outpost-Forwarded" // set on a request a follower forwards
	hdrRetry     = "X-Outpost-Retry"     // "1": the answering node could not decide; try the leader again
)

// Config configures the HTTP layer.
type Config struct {
	NodeID string
	// ForwardTimeout bounds how long a node keeps trying to reach a leader
	// for a write (default 5s).
	ForwardTimeout time.Duration
	// RequestTimeout bounds one forwarded request's wait for the leader's
	// answer, less a 2s margin (default 10s: the service's proposal bound).
	RequestTimeout time.Duration
	// TrustedProxies (IPs or CIDRs) are the peers whose X-Forwarded-For
	// names the client (pkg/httpguard); empty: the peer is the client.
	TrustedProxies []string
	// MaxConns and MaxConnsPerIP cap the open connections, in total and
	// from one address (trusted proxies exempt). Defaults 16384 and 1024.
	MaxConns      int
	MaxConnsPerIP int
}

func (c *Config) defaults() {
	if c.ForwardTimeout == 0 {
		c.ForwardTimeout = 5 * time.Second
	}
	if c.RequestTimeout == 0 {
		c.RequestTimeout = 10 * time.Second
	}
	if c.MaxConns <= 0 {
		c.MaxConns = 16384
	}
	if c.MaxConnsPerIP <= 0 {
		c.MaxConnsPerIP = 1024
	}
}

// DefaultConfig is the HTTP layer's defaults, for configurations that
// build on them (pkg/cloud).
func DefaultConfig() Config {
	var c Config
	c.defaults()
	return c
}

// Body limits by route, applied from the header before any of the body is
// read (bodyLimit).
const (
	// maxPolicyBytes bounds a Rego module, compressed or not.
	maxPolicyBytes = 256 << 10
)

// Server serves one node's HTTP API.
type Server struct {
	cfg     Config
	log     *slog.Logger
	svc     Service
	authn   auth.Authenticator
	cluster bool // cluster endpoints require the API token
	app     *fiber.App
	guard   *httpguard.Guard
	client  *http.Client
	zdec    *zstd.Decoder
	m       *httpMetrics
}

// New builds the server over the application layer; authn decides who is
// calling (the composition root chains the static tokens and the service's
// user tokens). Listen serves it.
func New(cfg Config, svc Service, authn auth.Authenticator, clusterNeedsToken bool,
	log *slog.Logger, reg *prometheus.Registry) (*Server, error) {
	cfg.defaults()
	zdec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(wire.MaxBodyBytes))
	if err != nil {
		return nil, fmt.Errorf("zstd decoder: %w", err)
	}
	s := &Server{
		cfg: cfg, log: log, svc: svc, authn: authn, cluster: clusterNeedsToken,
		zdec: zdec,
		client: &http.Client{Transport: &http.Transport{
			MaxIdleConnsPerHost: 64, IdleConnTimeout: 90 * time.Second, DisableCompression: true,
		}},
		m: newHTTPMetrics(reg),
	}
	if s.guard, err = httpguard.New(httpguard.Config{
		BodyLimit: s.bodyLimit, TrustedProxies: cfg.TrustedProxies,
		MaxConns: cfg.MaxConns, MaxConnsPerIP: cfg.MaxConnsPerIP,
		Registerer: reg, Logger: log,
	}); err != nil {
		zdec.Close()
		return nil, fmt.Errorf("httpapi: %w", err)
	}
	s.app = s.guard.App(fiber.Config{
		DisableStartupMessage: true,
		// The largest body of any route; bodyLimit decides per request.
		BodyLimit:    wire.MaxBodyBytes,
		ReadTimeout:  30 * time.Second,
		WriteTimeout: 30 * time.Second,
		IdleTimeout:  120 * time.Second,
		ErrorHandler: s.errorHandler,
	})
	s.routes(reg)
	return s, nil
}

// Serve accepts connections on ln (the raw TCP listener) until Shutdown.
// Accept errors (a full descriptor table) are retried, never returned, and
// connections beyond the caps are refused (pkg/httpguard).
func (s *Server) Serve(ln net.Listener) error {
	return s.app.Listener(s.guard.Listener(ln))
}

// App exposes the Fiber app, for tests that call app.Test.
func (s *Server) App() *fiber.App { return s.app }

// bodyLimit is each request's body limit, decided from its header before
// any of the body is read (pkg/httpguard). Only an edge's pushes carry big
// batches, so only a request to those routes that bears an edge's token may
// send up to wire.MaxBodyBytes; everything else, authenticated or not,
// is small.
func (s *Server) bodyLimit(_, path []byte, h *fasthttp.RequestHeader) int {
	switch {
	case httpguard.Route(path, "/sync/v1/push"), httpguard.Route(path, "/sync/v1/state"):
		if s.edgeToken(h.Peek(fiber.HeaderAuthorization)) {
			return wire.MaxBodyBytes
		}
	case httpguard.Route(path, "/api/v1/auth/login"), httpguard.Route(path, "/api/v1/auth/refresh"):
		return wire.MaxAuthRequestBytes
	case httpguard.RoutePrefix(path, "/api/v1/policies/"):
		return maxPolicyBytes
	}
	return wire.MaxRequestBytes
}

// edgeToken reports whether the Authorization header bears an edge's
// token. requireEdge authenticates the request again once it is routed.
func (s *Server) edgeToken(authz []byte) bool {
	tok := auth.BearerToken(string(authz))
	if tok == "" {
		return false
	}
	p, err := s.authn.Authenticate(context.Background(), tok)
	return err == nil && p.Kind == auth.KindEdge
}

// Shutdown stops accepting requests and waits for in-flight ones.
func (s *Server) Shutdown(ctx context.Context) error {
	err := s.app.ShutdownWithContext(ctx)
	s.zdec.Close()
	s.client.CloseIdleConnections()
	return err
}

func (s *Server) routes(reg *prometheus.Registry) {
	a := s.app
	// First, so every route (and the 404 fallback) is counted and timed
	// under the same names as on the edge.
	a.Use(obs.NewHTTPMetrics(reg).Middleware)
	a.Get("/healthz", func(c *fiber.Ctx) error { return ok(c, fiber.Map{"status": "alive"}) })
	a.Get("/readyz", s.ready)
	a.Get("/metrics", adaptor.HTTPHandler(promhttp.HandlerFor(reg, promhttp.HandlerOpts{})))

	cl := a.Group("/cluster/v1")
	cl.Get("/status", s.status)
	cl.Post("/join", s.requireCluster, s.join)
	cl.Delete("/nodes/:id", s.requireCluster, s.remove)
	cl.Post("/snapshot", s.requireCluster, s.snapshot)

	sy := a.Group("/sync/v1", s.requireEdge)
	sy.Post("/push", s.push)
	sy.Get("/pull", s.pull)
	sy.Post("/heartbeat", s.heartbeat)
	sy.Post("/state", s.state)

	a.Post("/api/v1/auth/login", s.login)
	a.Post("/api/v1/auth/refresh", s.refreshToken)
	api := a.Group("/api/v1", s.requireService)
	api.Get("/devices/:id", s.getDevice)
	api.Get("/devices/:id/readings", s.readings)
	api.Put("/devices/:id/desired", s.putDesired)
	api.Put("/devices/:id/meta", s.putMeta)
	api.Get("/edges", s.edges)
	api.Get("/edges/nearest", s.nearest)
	api.Get("/export", s.export)
	api.Get("/users/:openid", s.getUser)
	api.Put("/users/:openid", s.putUser)
	api.Delete("/users/:openid/sessions", s.revokeSessions)
	api.Get("/policies", s.listPolicies)
	api.Put("/policies/:name", s.putPolicy)

	a.Use(func(c *fiber.Ctx) error {
		return apiError(fiber.StatusNotFound, fmt.Sprintf("no route for %s %s", c.Method(), c.Path()))
	})
}

// --- envelope and errors -------------------------------------------------

func ok(c *fiber.Ctx, data any) error { return httpenv.OK(c, data) }

// httpError is an error with a status and a client-facing message.
type httpError struct {
	status     int
	msg        string
	retryAfter int
	headers    map[string]string
}

func (e *httpError) Error() string { return e.msg }

func apiError(status int, msg string) error { return &httpError{status: status, msg: msg} }

func (s *Server) errorHandler(c *fiber.Ctx, err error) error {
	var he *httpError
	var fe *fiber.Error
	switch {
	case errors.As(err, &he):
	case errors.As(err, &fe):
		he = &httpError{status: fe.Code, msg: fe.Message}
		if fe.Code == fiber.StatusRequestEntityTooLarge {
			he.msg = wire.BodyTooLarge(wire.MaxBodyBytes).Error()
		}
	default:
		if he = serviceStatus(err); he != nil {
			break
		}
		// Internal detail stays in the log, never in the body.
		s.log.Error("request failed", "method", c.Method(), "path", c.Path(), "err", err)
		he = &httpError{status: fiber.StatusInternalServerError, msg: "internal error; see the server log"}
	}
	if he.retryAfter > 0 {
		c.Set(wire.HeaderRetryAfter, strconv.Itoa(he.retryAfter))
	}
	for k, v := range he.headers {
		c.Set(k, v)
	}
	return httpenv.Fail(c, he.status, he.msg)
}

// --- authentication -------------------------------------------------------

func (s *Server) principal(c *fiber.Ctx) (auth.Principal, error) {
	tok := auth.BearerToken(c.Get(fiber.HeaderAuthorization))
	if tok == "" {
		return auth.Principal{}, apiError(fiber.StatusUnauthorized, "missing Authorization: Bearer <token> header")
	}
	p, err := s.authn.Authenticate(c.UserContext(), tok)
	if errors.Is(err, auth.ErrUnauthenticated) {
		return p, apiError(fiber.StatusUnauthorized, "unknown token")
	}
	return p, err
}

func (s *Server) requireEdge(c *fiber.Ctx) error {
	p, err := s.principal(c)
	if err != nil {
		return err
	}
	if p.Kind != auth.KindEdge {
		return apiError(fiber.StatusForbidden, "the sync API takes an edge token (-edge-token)")
	}
	c.Locals("edge", p.Edge)
	return c.Next()
}

func (s *Server) requireService(c *fiber.Ctx) error {
	p, err := s.principal(c)
	if err != nil {
		return err
	}
	if p.Kind == auth.KindUser && slices.Contains(p.Roles, "admin") {
		return c.Next()
	}
	if p.Kind != auth.KindService {
		// User tokens come with the identity issue; until then only the
		// service token reaches the consumer API.
		return apiError(fiber.StatusForbidden, "the consumer API takes the API token (-api-token)")
	}
	return c.Next()
}

func (s *Server) requireCluster(c *fiber.Ctx) error {
	if !s.cluster {
		return c.Next()
	}
	return s.requireService(c)
}

// --- leader routing -------------------------------------------------------

// onLeader runs local on the leader; on a follower it forwards the request
// to the leader and relays the answer, retrying across leader changes until
// ForwardTimeout.
func (s *Server) onLeader(c *fiber.Ctx, local func(c *fiber.Ctx) error) error {
	deadline := time.Now().Add(s.cfg.ForwardTimeout)
	forwarded := c.Get(hdrForwarded) != ""
	for {
		if s.svc.IsLeader() {
			err := local(c)
			if !errors.Is(err, service.ErrNotLeader) {
				return err
			}
		} else if forwarded {
			// One hop only: the forwarder picks the next leader itself.
			return &httpError{status: fiber.StatusServiceUnavailable, msg: "this node is not the leader",
				retryAfter: 1, headers: map[string]string{hdrRetry: "1"}}
		} else if id, addr, known := s.svc.Leader(); known && id != s.cfg.NodeID {
			done, err := s.proxy(c, addr)
			if done {
				return err
			}
		}
		if time.Now().After(deadline) {
			return &httpError{status: fiber.StatusServiceUnavailable,
				msg: "no raft leader is reachable right now (election in progress or quorum lost); retry shortly", retryAfter: 1}
		}
		select {
		case <-time.After(25 * time.Millisecond):
		case <-c.Context().Done():
			return apiError(fiber.StatusServiceUnavailable, "request cancelled")
		}
	}
}

// proxy relays c to the node at addr. done is false when the leader could
// not be reached or answered that it is no longer leader.
func (s *Server) proxy(c *fiber.Ctx, addr string) (done bool, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.RequestTimeout+2*time.Second)
	defer cancel()
	url := "http://" + addr + string(c.Request().URI().RequestURI())
	req, err := http.NewRequestWithContext(ctx, c.Method(), url, bytes.NewReader(c.Request().Body()))
	if err != nil {
		return true, err
	}
	for _, h := range []string{fiber.HeaderAuthorization, fiber.HeaderContentType, fiber.HeaderContentEncoding, fiber.HeaderAccept} {
		if v := c.Get(h); v != "" {
			req.Header.Set(h, v)
		}
	}
	req.Header.Set(hdrForwarded, s.cfg.NodeID)
	resp, err := s.client.Do(req)
	if err != nil {
		s.m.forwarded.WithLabelValues("unreachable").Inc()
		return false, nil
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 256<<20))
	if err != nil {
		s.m.forwarded.WithLabelValues("unreachable").Inc()
		return false, nil
	}
	if resp.StatusCode == fiber.StatusServiceUnavailable && resp.Header.Get(hdrRetry) != "" {
		s.m.forwarded.WithLabelValues("retry").Inc()
		return false, nil
	}
	s.m.forwarded.WithLabelValues("ok").Inc()
	for _, h := range []string{fiber.HeaderContentType, wire.HeaderRetryAfter, wire.HeaderExpectedSeq, hdrNextCursor} {
		if v := resp.Header.Get(h); v != "" {
			c.Set(h, v)
		}
	}
	return true, c.Status(resp.StatusCode).Send(body)
}

// read serves a read locally, or leader-confirmed with consistency=strong.
func (s *Server) read(c *fiber.Ctx, local func(c *fiber.Ctx) error) error {
	switch c.Query("consistency") {
	case "", "local", "weak":
		return local(c)
	case "strong":
		return s.onLeader(c, func(c *fiber.Ctx) error {
			if err := s.svc.Barrier(c.UserContext()); err != nil {
				return err
			}
			return local(c)
		})
	}
	return apiError(fiber.StatusBadRequest, "consistency must be strong or local")
}

// --- bodies ---------------------------------------------------------------

// body returns the request body decompressed per Content-Encoding, capped
// at wire.MaxBodyBytes.
func (s *Server) body(c *fiber.Ctx) ([]byte, error) {
	raw := c.Request().Body()
	switch enc := strings.ToLower(strings.TrimSpace(c.Get(fiber.HeaderContentEncoding))); enc {
	case "", "identity":
		return raw, nil
	case wire.EncodingZstd:
		out, err := s.zdec.DecodeAll(raw, nil)
		if err != nil {
			return nil, apiError(fiber.StatusBadRequest, "body is not valid zstd (or decompresses beyond the size limit)")
		}
		return out, nil
	case wire.EncodingGzip:
		zr, err := gzip.NewReader(bytes.NewReader(raw))
		if err != nil {
			return nil, apiError(fiber.StatusBadRequest, "body is not valid gzip")
		}
		out, err := io.ReadAll(io.LimitReader(zr, wire.MaxBodyBytes+1))
		if err != nil {
			return nil, apiError(fiber.StatusBadRequest, "body is not valid gzip")
		}
		if len(out) > wire.MaxBodyBytes {
			return nil, apiError(fiber.StatusRequestEntityTooLarge, fmt.Sprintf("decompressed body larger than %d bytes", wire.MaxBodyBytes))
		}
		return out, nil
	default:
		return nil, apiError(fiber.StatusUnsupportedMediaType, fmt.Sprintf("Content-Encoding %q not supported (use zstd, gzip or none)", enc))
	}
}

func (s *Server) decode(c *fiber.Ctx, v any) error {
	b, err := s.body(c)
	if err != nil {
		return err
	}
	if len(bytes.TrimSpace(b)) == 0 {
		return apiError(fiber.StatusBadRequest, "request body is empty; a JSON object is required")
	}
	// goccy/go-json: a drop-in decoder several times faster than
	// encoding/json on large push batches.
	dec := gojson.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		// Error path only: encoding/json names the offending field and
		// offset, which goccy's errors do not.
		std := json.NewDecoder(bytes.NewReader(b))
		std.DisallowUnknownFields()
		if serr := std.Decode(v); serr != nil {
			err = serr
		}
		return apiError(fiber.StatusBadRequest, "malformed JSON body: "+jsonErrText(err))
	}
	if dec.More() {
		return apiError(fiber.StatusBadRequest, "malformed JSON body: trailing data after the object")
	}
	return nil
}

func jsonErrText(err error) string {
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.As(err, &se):
		return fmt.Sprintf("syntax error at byte %d: %s", se.Offset, se.Error())
	case errors.As(err, &te):
		return fmt.Sprintf("field %q must be %s, got %s", te.Field, te.Type, te.Value)
	case errors.Is(err, io.ErrUnexpectedEOF):
		return "unexpected end of input"
	}
	return err.Error()
}

func invalid(err error) error {
	if errors.Is(err, wire.ErrInvalid) {
		return apiError(fiber.StatusBadRequest, err.Error())
	}
	return err
}

type httpMetrics struct {
	forwarded *prometheus.CounterVec
}

func newHTTPMetrics(reg prometheus.Registerer) *httpMetrics {
	m := &httpMetrics{
		forwarded: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outpost_cloud_forwarded_total",
			Help: "Requests this node forwarded to the leader, by outcome."}, []string{"outcome"}),
	}
	reg.MustRegister(m.forwarded)
	return m
}
