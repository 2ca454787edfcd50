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
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
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

	"github.com/outpost-edge/outpost/pkg/authlimit"
	"github.com/outpost-edge/outpost/pkg/certs"
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
	// AuthFailureLimit throttles failed bearer-token checks per client
	// address (package authlimit): failures per second, burst twice that;
	// past it the address gets 429 with Retry-After. 0 disables.
	AuthFailureLimit float64
	// PeerTLS, when set, is how this node calls the others' HTTP ports
	// (https): with cluster TLS, the cluster client settings
	// (certs.Cluster.ClientConfig), so the leader sees a member.
	PeerTLS *tls.Config
	// HasAPIToken and ClusterTLS say which cluster credentials this node
	// accepts, for the messages of refused cluster calls.
	HasAPIToken, ClusterTLS bool
	// MetricsToken, when set, is a bearer token that reads /metrics.
	MetricsToken string
	// TrustedProxies (IPs or CIDRs) are the peers whose X-Forwarded-For
	// names the client (pkg/httpguard); empty: the peer is the client.
	TrustedProxies []string
	// MaxConns and MaxConnsPerIP cap the open connections, in total and
	// from one address (trusted proxies exempt). Defaults 16384 and 1024.
	MaxConns      int
	MaxConnsPerIP int
	// PullHold is the longest the service holds an empty pull (the
	// service's Config.PullHold, default wire.MaxPullWait): the server's
	// read and write timeouts and a follower's wait for a forwarded pull
	// allow for it.
	PullHold time.Duration
	// TLS, when set, serves the port over TLS. Serve layers it over the
	// connection caps, so handlers still see a *tls.Conn (cluster peers
	// are told apart by their verified certificate).
	TLS *tls.Config
	// Sinks reports and manages the export sinks (/api/v1/sinks); nil:
	// none.
	Sinks Sinks
}

func (c *Config) defaults() {
	if c.ForwardTimeout == 0 {
		c.ForwardTimeout = 5 * time.Second
	}
	if c.RequestTimeout == 0 {
		c.RequestTimeout = 10 * time.Second
	}
	if c.PullHold <= 0 {
		c.PullHold = wire.MaxPullWait
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
	metrics *[32]byte // digest of cfg.MetricsToken; nil: none
	scheme  string    // of other nodes' HTTP ports: "https" with PeerTLS
	app     *fiber.App
	guard   *httpguard.Guard
	client  *http.Client
	zdec    *zstd.Decoder
	m       *httpMetrics
	limiter *authlimit.Limiter // nil: auth failures are not throttled
	// base ends when Shutdown starts: held pulls (and their forwarding)
	// return at once instead of delaying it.
	base     context.Context
	stopBase context.CancelFunc
}

// New builds the server over the application layer; authn decides who is
// calling (the composition root chains the static tokens and the service's
// user tokens). Listen serves it.
func New(cfg Config, svc Service, authn auth.Authenticator, log *slog.Logger, reg *prometheus.Registry) (*Server, error) {
	cfg.defaults()
	zdec, err := newZstdDecoder()
	if err != nil {
		return nil, err
	}
	s := &Server{
		cfg: cfg, log: log, svc: svc, authn: authn, scheme: "http",
		zdec: zdec,
		client: &http.Client{Transport: &http.Transport{
			MaxIdleConnsPerHost: 64, IdleConnTimeout: 90 * time.Second, DisableCompression: true,
			TLSClientConfig: cfg.PeerTLS,
		}},
		m:       newHTTPMetrics(reg),
		limiter: authlimit.New(authlimit.Config{Rate: cfg.AuthFailureLimit}),
	}
	s.base, s.stopBase = context.WithCancel(context.Background())
	if cfg.PeerTLS != nil {
		s.scheme = "https"
	}
	if cfg.MetricsToken != "" {
		h := sha256.Sum256([]byte(cfg.MetricsToken))
		s.metrics = &h
	}
	if s.guard, err = httpguard.New(httpguard.Config{
		BodyLimit: s.bodyLimit, TrustedProxies: cfg.TrustedProxies,
		MaxConns: cfg.MaxConns, MaxConnsPerIP: cfg.MaxConnsPerIP,
		Registerer: reg, Logger: log,
	}); err != nil {
		zdec.Close()
		return nil, fmt.Errorf("httpapi: %w", err)
	}
	// A held pull answers up to PullHold after its request was read (and
	// a forwarded one after the leader's hold): the timeouts allow for it.
	timeout := max(30*time.Second, cfg.PullHold+cfg.RequestTimeout+5*time.Second)
	s.app = s.guard.App(fiber.Config{
		DisableStartupMessage: true,
		// The largest body of any route; bodyLimit decides per request.
		BodyLimit:    wire.MaxBodyBytes,
		ReadTimeout:  timeout,
		WriteTimeout: timeout,
		IdleTimeout:  max(120*time.Second, 2*timeout),
		ErrorHandler: s.errorHandler,
	})
	s.routes(reg)
	return s, nil
}

// Serve accepts connections on ln (the raw TCP listener) until Shutdown.
// Accept errors (a full descriptor table) are retried, never returned, and
// connections beyond the caps are refused (pkg/httpguard).
func (s *Server) Serve(ln net.Listener) error {
	l := s.guard.Listener(ln)
	if s.cfg.TLS != nil {
		l = tls.NewListener(l, s.cfg.TLS)
	}
	return s.app.Listener(l)
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
	case httpguard.Route(path, "/sync/v1/push"), httpguard.Route(path, "/sync/v1/state"), httpguard.Route(path, "/sync/v1/alerts"):
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
	s.stopBase()
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
	a.Get("/metrics", s.requireMetrics, adaptor.HTTPHandler(promhttp.HandlerFor(reg, promhttp.HandlerOpts{})))

	// Membership, snapshots and the status (raft addresses) are the
	// cluster's: a member's certificate or the service token.
	cl := a.Group("/cluster/v1", s.requireCluster)
	cl.Get("/status", s.status)
	cl.Post("/join", s.join)
	cl.Delete("/nodes/:id", s.remove)
	cl.Post("/snapshot", s.snapshot)

	sy := a.Group("/sync/v1", s.requireEdge)
	sy.Post("/push", s.push)
	sy.Get("/pull", s.pull)
	sy.Post("/heartbeat", s.heartbeat)
	sy.Post("/state", s.state)
	sy.Post("/alerts", s.pushAlerts)

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
	api.Get("/sinks", s.sinks)
	api.Delete("/sinks/:name", s.forgetSink)
	api.Get("/users/:openid", s.getUser)
	api.Put("/users/:openid", s.putUser)
	api.Delete("/users/:openid/sessions", s.revokeSessions)
	api.Get("/policies", s.listPolicies)
	api.Put("/policies/:name", s.putPolicy)
	api.Get("/rules", s.listRules)
	api.Put("/rules/:name", s.putRule)
	api.Delete("/rules/:name", s.deleteRule)
	api.Get("/alerts", s.listAlerts)
	api.Post("/alerts/:id/ack", s.ackAlert)

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

// principal authenticates the bearer token. An address that keeps
// presenting unknown tokens is throttled (429) before its token is checked,
// so guessing runs at Config.AuthFailureLimit per second per address.
func (s *Server) principal(c *fiber.Ctx) (auth.Principal, error) {
	tok := auth.BearerToken(c.Get(fiber.HeaderAuthorization))
	if tok == "" {
		s.m.authFailures.WithLabelValues("missing").Inc()
		return auth.Principal{}, apiError(fiber.StatusUnauthorized, "missing Authorization: Bearer <token> header")
	}
	addr := c.IP()
	if wait, ok := s.limiter.Allow(addr); !ok {
		s.m.authFailures.WithLabelValues("throttled").Inc()
		return auth.Principal{}, &httpError{status: fiber.StatusTooManyRequests,
			msg: "too many failed authentications from this address; retry later", retryAfter: int(math.Ceil(wait.Seconds()))}
	}
	p, err := s.authn.Authenticate(c.UserContext(), tok)
	if errors.Is(err, auth.ErrUnauthenticated) {
		s.limiter.Fail(addr)
		s.m.authFailures.WithLabelValues("unknown").Inc()
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

// clusterPeer reports whether the request came over a connection whose
// handshake verified a cluster member's certificate.
func clusterPeer(c *fiber.Ctx) bool { return certs.IsClusterPeer(c.Context().TLSConnectionState()) }

// requireCluster admits cluster members (by certificate) and the service
// token, in every mode: a node without either configured refuses cluster
// changes rather than run them for anyone. User tokens do not count, not
// even an admin's: membership is the cluster operator's, not the
// application's. A follower forwards a cluster call to the leader only
// after this check passed on the follower.
func (s *Server) requireCluster(c *fiber.Ctx) error {
	if clusterPeer(c) {
		return c.Next()
	}
	if !s.cfg.HasAPIToken && !s.cfg.ClusterTLS {
		return apiError(fiber.StatusForbidden, "this node accepts no cluster credential: start cloud-sync with -api-token "+
			"(and send it as a Bearer token) or with -cluster-ca, -cluster-cert and -cluster-key")
	}
	p, err := s.principal(c)
	if err != nil {
		var he *httpError
		if errors.As(err, &he) && he.status == fiber.StatusUnauthorized {
			he.msg = "the cluster API needs the API token (Authorization: Bearer, -api-token) or a cluster certificate: " + he.msg
		}
		return err
	}
	if p.Kind != auth.KindService {
		return apiError(fiber.StatusForbidden, "the cluster API takes the API token (-api-token) or a cluster certificate")
	}
	return c.Next()
}

// requireMetrics admits the metrics token, the service token and cluster
// members: the page names routes, edges' activity and raft's state.
func (s *Server) requireMetrics(c *fiber.Ctx) error {
	if clusterPeer(c) {
		return c.Next()
	}
	tok := auth.BearerToken(c.Get(fiber.HeaderAuthorization))
	if tok != "" && s.metrics != nil {
		h := sha256.Sum256([]byte(tok))
		if subtle.ConstantTimeCompare(h[:], s.metrics[:]) == 1 {
			return c.Next()
		}
	}
	const need = "/metrics needs a credential: the metrics token (-metrics-token), the API token or a cluster certificate"
	if tok == "" {
		return apiError(fiber.StatusUnauthorized, need)
	}
	p, err := s.authn.Authenticate(c.UserContext(), tok)
	switch {
	case errors.Is(err, auth.ErrUnauthenticated):
		return apiError(fiber.StatusUnauthorized, need+" (unknown token)")
	case err != nil:
		return err
	case p.Kind != auth.KindService:
		return apiError(fiber.StatusForbidden, need)
	}
	return c.Next()
}

// --- leader routing -------------------------------------------------------

// onLeader runs local on the leader; on a follower it forwards the request
// to the leader and relays the answer, retrying across leader changes until
// ForwardTimeout.
func (s *Server) onLeader(c *fiber.Ctx, local func(c *fiber.Ctx) error) error {
	return s.onLeaderHeld(c, 0, local)
}

// onLeaderHeld is onLeader for a request the leader may hold for up to
// hold before it answers (a long-polling pull).
func (s *Server) onLeaderHeld(c *fiber.Ctx, hold time.Duration, local func(c *fiber.Ctx) error) error {
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
			done, err := s.proxy(c, addr, hold)
			if done {
				return err
			}
		}
		if hold > 0 && s.base.Err() != nil {
			// A held pull forwarded from here ends with the shutdown; the
			// edge pulls again from another node. Other requests in flight
			// are forwarded to the end (they are drained, not cut).
			return &httpError{status: fiber.StatusServiceUnavailable, msg: "this node is shutting down", retryAfter: 1}
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
func (s *Server) proxy(c *fiber.Ctx, addr string, hold time.Duration) (done bool, err error) {
	parent := context.Background()
	if hold > 0 {
		parent = s.base // a held pull ends with the shutdown
	}
	ctx, cancel := context.WithTimeout(parent, s.cfg.RequestTimeout+2*time.Second+hold)
	defer cancel()
	url := s.scheme + "://" + addr + string(c.Request().URI().RequestURI())
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
	c.Set(wire.HeaderLeader, s.scheme+"://"+addr)
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

// leaderRead serves a read of the leader's soft state (the directory) on
// the leader, forwarding it from a follower; consistency=strong also
// confirms leadership first.
func (s *Server) leaderRead(c *fiber.Ctx, local func(c *fiber.Ctx) error) error {
	switch cons := c.Query("consistency"); cons {
	case "", "local", "weak", "strong":
		return s.onLeader(c, func(c *fiber.Ctx) error {
			if cons == "strong" {
				if err := s.svc.Barrier(c.UserContext()); err != nil {
					return err
				}
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
	return s.decompress(c.Get(fiber.HeaderContentEncoding), c.Request().Body())
}

// newZstdDecoder is the request bodies' zstd decoder: bounded to
// wire.MaxBodyBytes of output.
func newZstdDecoder() (*zstd.Decoder, error) {
	zdec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(0), zstd.WithDecoderMaxMemory(wire.MaxBodyBytes))
	if err != nil {
		return nil, fmt.Errorf("zstd decoder: %w", err)
	}
	return zdec, nil
}

// decompress decodes raw per the Content-Encoding enc, capped at
// wire.MaxBodyBytes.
func (s *Server) decompress(enc string, raw []byte) ([]byte, error) {
	switch enc := strings.ToLower(strings.TrimSpace(enc)); enc {
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

// decode decodes a consumer or cluster request body into v.
func (s *Server) decode(c *fiber.Ctx, v any) error {
	b, err := s.body(c)
	if err != nil {
		return err
	}
	return decodeJSON(b, v, wire.MaxJSONDepth)
}

// decodeBatch decodes a sync batch (push or state) into v: decompression,
// the JSON rules at the sync depth and strict decoding. The service
// validates the batch's shape (wire's Validate).
func (s *Server) decodeBatch(c *fiber.Ctx, v any) error {
	return s.decodeBatchBody(c.Get(fiber.HeaderContentEncoding), c.Request().Body(), v)
}

// decodePush decodes a push body: through wire.DecodePushBatch when it
// takes the body (the readings an edge sends, without a map or reflection
// per reading), else as every batch (decodeBatch), which words the
// refusals. Both give the same batch for what the fast path takes.
func (s *Server) decodePush(c *fiber.Ctx, b *wire.PushBatch) error {
	return s.decodePushBody(c.Get(fiber.HeaderContentEncoding), c.Request().Body(), b)
}

func (s *Server) decodePushBody(enc string, raw []byte, b *wire.PushBatch) error {
	body, err := s.decompress(enc, raw)
	if err != nil {
		return err
	}
	if wire.DecodePushBatch(body, b, decodeChange) {
		return nil
	}
	*b = wire.PushBatch{}
	return decodeJSON(body, b, wire.MaxSyncJSONDepth)
}

// decodeChange decodes one change of a push as decodeJSON decodes the
// whole batch (the fast path checked the JSON rules of raw).
func decodeChange(raw []byte, c *wire.Change) error {
	dec := gojson.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	return dec.Decode(c)
}

func (s *Server) decodeBatchBody(enc string, raw []byte, v any) error {
	b, err := s.decompress(enc, raw)
	if err != nil {
		return err
	}
	return decodeJSON(b, v, wire.MaxSyncJSONDepth)
}

// decodeJSON checks b against the shared JSON rules (wire.CheckJSON at
// depth) and decodes it strictly into v.
func decodeJSON(b []byte, v any, depth int) error {
	if len(bytes.TrimSpace(b)) == 0 {
		return apiError(fiber.StatusBadRequest, "request body is empty; a JSON object is required")
	}
	// The rules before decoding: a decoder keeps 1e400 and invalid UTF-8
	// inside raw values (state), which would then be stored and served to
	// phones. Grammar errors are left to the decoders, which word them.
	checked := wire.CheckJSON(b, depth)
	if checked != nil && !errors.Is(checked, wire.ErrJSONSyntax) {
		return apiError(fiber.StatusBadRequest, "request body refused: "+checked.Error())
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
	if checked != nil { // a decoder took what the grammar refuses
		return apiError(fiber.StatusBadRequest, "malformed JSON body: "+checked.Error())
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
	forwarded    *prometheus.CounterVec
	authFailures *prometheus.CounterVec
}

func newHTTPMetrics(reg prometheus.Registerer) *httpMetrics {
	m := &httpMetrics{
		forwarded: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outpost_cloud_forwarded_total",
			Help: "Requests this node forwarded to the leader, by outcome."}, []string{"outcome"}),
		authFailures: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outpost_cloud_auth_failures_total",
			Help: "Failed bearer-token checks, by reason: missing (no token), unknown (no authenticator accepted it), throttled (refused unchecked: the address failed too often)."},
			[]string{"reason"}),
	}
	reg.MustRegister(m.forwarded, m.authFailures)
	return m
}
