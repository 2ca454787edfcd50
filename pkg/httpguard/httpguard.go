// Package httpguard hardens the edge's and the cloud's Fiber servers below
// routing, where fasthttp reads and parses requests, so both daemons refuse
// the same things the same way:
//
//   - Body limits per request, decided from the header before any of the
//     body is read (fasthttp's own limit is one number for every route):
//     a declared Content-Length over the limit is refused at once, and a
//     chunked body is cut off once it passes it.
//   - Strict framing: a request with more than one Content-Length, with
//     both Content-Length and Transfer-Encoding, or with a Transfer-Encoding
//     other than chunked is answered 400 and its connection closed, before
//     its body is read, so nothing behind it on the connection is parsed.
//   - Requests fasthttp cannot parse get a fixed envelope (400, 408, 413,
//     431) that never echoes the request (fasthttp's own error text quotes
//     the raw header block, Authorization included).
//   - X-Forwarded-For is believed only from configured trusted proxies, and
//     the client is its rightmost address that is not one of them, so a
//     client cannot choose its own address by sending the header.
//   - The listener (package netlimit) survives accept errors such as
//     EMFILE and caps connections, in total and per address.
//
// Counters: outpost_http_accept_errors_total, outpost_http_connections_refused_total{reason}
// and outpost_http_requests_refused_total{reason}.
package httpguard

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/valyala/fasthttp"

	"github.com/outpost-edge/outpost/pkg/netlimit"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// HeaderClientIP carries the client address derived from X-Forwarded-For
// for a request from a trusted proxy: Fiber's ProxyHeader, so c.IP() is the
// client's address. It is set only for trusted peers (and c.IP() reads it
// only for them), so a client sending it gains nothing.
const HeaderClientIP = "X-Outpost-Client-Ip"

// headerBadFraming marks, between the header hook and the handler, a
// request refused for its framing.
const headerBadFraming = "X-Outpost-Bad-Framing"

// BodyLimit returns the largest body to read for a request, from its
// method, its normalised path (as Fiber routes it, but not lower-cased) and
// its header; it runs before any of the body is read, on every request,
// and must be cheap. A result ≤ 0 means the app's Fiber BodyLimit.
type BodyLimit func(method, path []byte, h *fasthttp.RequestHeader) int

// Config configures a Guard.
type Config struct {
	BodyLimit BodyLimit
	// TrustedProxies are the addresses (IPs or CIDRs) whose X-Forwarded-For
	// header is believed; they are also exempt from MaxConnsPerIP.
	TrustedProxies []string
	// MaxConns caps open connections; MaxConnsPerIP caps them per remote
	// address. 0 is no cap.
	MaxConns      int
	MaxConnsPerIP int
	Registerer    prometheus.Registerer // nil: unregistered
	Logger        *slog.Logger
}

// Guard applies Config to one Fiber app and its listener.
type Guard struct {
	cfg     Config
	proxies []netip.Prefix
	log     *slog.Logger

	acceptErrors prometheus.Counter
	connsRefused *prometheus.CounterVec
	reqsRefused  *prometheus.CounterVec
}

// New checks cfg and registers the guard's metrics.
func New(cfg Config) (*Guard, error) {
	proxies, err := ParseTrustedProxies(cfg.TrustedProxies)
	if err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	g := &Guard{cfg: cfg, proxies: proxies, log: cfg.Logger,
		acceptErrors: prometheus.NewCounter(prometheus.CounterOpts{Name: "outpost_http_accept_errors_total",
			Help: "Failed accepts on the HTTP listener (such as EMFILE), each retried after a backoff."}),
		connsRefused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outpost_http_connections_refused_total",
			Help: "HTTP connections closed on accept, by the cap they were over (max_conns, max_conns_per_ip)."}, []string{"reason"}),
		reqsRefused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "outpost_http_requests_refused_total",
			Help: "HTTP requests refused before routing, by reason (malformed, framing, too_large, header_too_large, timeout)."}, []string{"reason"}),
	}
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{g.acceptErrors, g.connsRefused, g.reqsRefused} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("httpguard: register metrics: %w", err)
			}
		}
	}
	return g, nil
}

// ParseTrustedProxies reads IPs and CIDRs (what TrustedProxies holds), for
// configuration checks.
func ParseTrustedProxies(list []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range list {
		s = strings.TrimSpace(s)
		if strings.Contains(s, "/") {
			p, err := netip.ParsePrefix(s)
			if err != nil {
				return nil, fmt.Errorf("trusted proxy %q is not an IP address or CIDR", s)
			}
			if p.Addr().Is4In6() {
				p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
			}
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("trusted proxy %q is not an IP address or CIDR", s)
		}
		a = a.Unmap()
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	return out, nil
}

// App builds a Fiber app with fc and the guard installed: trusted proxies,
// the per-request body limit, strict framing and the fixed error answers.
// fc's BodyLimit stays the largest body any request may have.
func (g *Guard) App(fc fiber.Config) *fiber.App {
	fc.EnableTrustedProxyCheck = true
	fc.TrustedProxies = make([]string, len(g.proxies))
	for i, p := range g.proxies {
		fc.TrustedProxies[i] = p.String()
	}
	fc.ProxyHeader = HeaderClientIP
	// No route takes a form; fasthttp would otherwise parse multipart
	// bodies (to temporary files) before any handler runs.
	fc.DisablePreParseMultipartForm = true
	app := fiber.New(fc)
	srv := app.Server()
	srv.SecureErrorLogMessage = true
	srv.HeaderReceived = g.headerReceived
	srv.ErrorHandler = g.requestError
	next := srv.Handler
	srv.Handler = func(ctx *fasthttp.RequestCtx) { g.serve(ctx, next) }
	return app
}

// Listener wraps the raw TCP listener: accept errors back off and are
// counted, and connections over the caps are answered 503 (total) or 429
// (per address) and closed.
func (g *Guard) Listener(ln net.Listener) net.Listener {
	return netlimit.New(ln, netlimit.Config{
		MaxConns: g.cfg.MaxConns, MaxConnsPerIP: g.cfg.MaxConnsPerIP,
		Exempt:      g.trusted,
		Refuse:      g.refuseConn,
		AcceptError: func(error) { g.acceptErrors.Inc() },
		Name:        "http", Logger: g.log,
	})
}

var (
	refuseTotal = rawResponse(fiber.StatusServiceUnavailable, "too many connections; retry later")
	refusePerIP = rawResponse(fiber.StatusTooManyRequests, "too many connections from this address; retry later")
)

func (g *Guard) refuseConn(c net.Conn, reason error) {
	resp, label := refuseTotal, "max_conns"
	if errors.Is(reason, netlimit.ErrTooManyConnsPerIP) {
		resp, label = refusePerIP, "max_conns_per_ip"
	}
	g.connsRefused.WithLabelValues(label).Inc()
	// On the accept path: a fresh socket's send buffer takes this at once,
	// and the deadline covers the case where it would not.
	_ = c.SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
	_, _ = c.Write(resp)
}

// rawResponse is a whole HTTP response carrying an error envelope, for a
// connection no server reads from.
func rawResponse(status int, msg string) []byte {
	body := envelope(status, msg)
	return []byte(fmt.Sprintf("HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"+
		"Retry-After: 1\r\nConnection: close\r\n\r\n%s", status, fasthttp.StatusMessage(status), len(body), body))
}

func envelope(status int, msg string) []byte {
	b, _ := json.Marshal(wire.Envelope[any]{Code: status, Message: msg, Data: nil})
	return b
}

// headerReceived runs once a request's header is parsed, before its body
// is read: it refuses bad framing (by reading no body and marking the
// request for serve) and sets the request's body limit.
func (g *Guard) headerReceived(h *fasthttp.RequestHeader) fasthttp.RequestConfig {
	if bad := checkFraming(h.RawHeaders()); bad != framingOK {
		// Read no body and close after answering: what follows on the
		// connection is never parsed as a request.
		h.SetContentLength(0)
		h.SetConnectionClose()
		h.SetBytesV(headerBadFraming, []byte{byte('0' + bad)})
		return fasthttp.RequestConfig{MaxRequestBodySize: 1}
	}
	if g.cfg.BodyLimit == nil {
		return fasthttp.RequestConfig{}
	}
	return fasthttp.RequestConfig{MaxRequestBodySize: g.limit(h)}
}

func (g *Guard) limit(h *fasthttp.RequestHeader) int {
	path := h.RequestURI()
	if i := bytes.IndexAny(path, "?#"); i >= 0 {
		path = path[:i]
	}
	// The common path needs no normalising; the rest is normalised as
	// fasthttp does for routing, so "/x/../sync/v1/%70ush" is a push too.
	if len(path) > 0 && path[0] == '/' && !bytes.ContainsAny(path, "%.\\") && !bytes.Contains(path, []byte("//")) {
		return g.cfg.BodyLimit(h.Method(), path, h)
	}
	u := fasthttp.AcquireURI()
	defer fasthttp.ReleaseURI(u)
	if err := u.Parse(nil, h.RequestURI()); err != nil {
		return g.cfg.BodyLimit(h.Method(), h.RequestURI(), h)
	}
	return g.cfg.BodyLimit(h.Method(), u.Path(), h)
}

// serve answers a request marked for bad framing, else sets the client
// address from a trusted proxy's X-Forwarded-For and runs the app.
func (g *Guard) serve(ctx *fasthttp.RequestCtx, next fasthttp.RequestHandler) {
	h := &ctx.Request.Header
	if h.ConnectionClose() {
		if mark := h.Peek(headerBadFraming); len(mark) > 0 {
			// A client sending the marker itself only has its own
			// request refused, with the generic message.
			msg := "malformed HTTP request"
			if len(mark) == 1 && mark[0] > '0' && int(mark[0]-'0') < len(framingMessages) {
				msg = framingMessages[mark[0]-'0']
			}
			g.reqsRefused.WithLabelValues("framing").Inc()
			g.log.Debug("refused a request for its framing", "remote", ctx.RemoteIP().String(), "why", msg)
			reply(ctx, fiber.StatusBadRequest, msg)
			ctx.SetConnectionClose()
			return
		}
	}
	if len(g.proxies) > 0 {
		if peer, ok := netip.AddrFromSlice(ctx.RemoteIP()); ok && g.trusted(peer.Unmap()) {
			h.Set(HeaderClientIP, g.clientIP(peer.Unmap(), h.PeekAll(fiber.HeaderXForwardedFor)).String())
		}
	}
	next(ctx)
}

func (g *Guard) trusted(a netip.Addr) bool {
	for _, p := range g.proxies {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// clientIP walks X-Forwarded-For from the right (the hop nearest to us)
// past trusted proxies: the first address that is not one is the client.
// Addresses left of it were written by the client and are not believed.
// An entry that is not an address ends the walk at the last trusted hop.
func (g *Guard) clientIP(peer netip.Addr, headers [][]byte) netip.Addr {
	client := peer
	for i := len(headers) - 1; i >= 0; i-- {
		rest := headers[i]
		for len(rest) > 0 {
			var entry []byte
			if j := bytes.LastIndexByte(rest, ','); j >= 0 {
				entry, rest = rest[j+1:], rest[:j]
			} else {
				entry, rest = rest, nil
			}
			a, ok := parseHop(bytes.TrimSpace(entry))
			if !ok {
				return client
			}
			client = a
			if !g.trusted(a) {
				return a
			}
		}
	}
	return client
}

// parseHop reads an X-Forwarded-For entry: an address, optionally with a
// port ("1.2.3.4:5", "[::1]:5").
func parseHop(b []byte) (netip.Addr, bool) {
	s := string(b)
	if a, err := netip.ParseAddr(s); err == nil {
		return a.Unmap(), true
	}
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap.Addr().Unmap(), true
	}
	return netip.Addr{}, false
}

// requestError answers a request fasthttp could not read. The error's text
// is never sent: it can quote the request.
func (g *Guard) requestError(ctx *fasthttp.RequestCtx, err error) {
	status, msg, reason := fiber.StatusBadRequest, "malformed HTTP request", "malformed"
	var small *fasthttp.ErrSmallBuffer
	var ne net.Error
	switch {
	case errors.As(err, &small):
		status, msg, reason = fiber.StatusRequestHeaderFieldsTooLarge, "request header too large", "header_too_large"
	case errors.Is(err, fasthttp.ErrBodyTooLarge):
		status, reason = fiber.StatusRequestEntityTooLarge, "too_large"
		msg = wire.BodyTooLarge(g.limit(&ctx.Request.Header)).Error()
	case errors.Is(err, fasthttp.ErrTimeout), errors.As(err, &ne) && ne.Timeout():
		status, msg, reason = fiber.StatusRequestTimeout, "request timeout", "timeout"
	}
	g.reqsRefused.WithLabelValues(reason).Inc()
	g.log.Debug("refused an unreadable request", "remote", ctx.RemoteIP().String(), "status", status, "err", err)
	reply(ctx, status, msg)
}

func reply(ctx *fasthttp.RequestCtx, status int, msg string) {
	ctx.Response.Reset()
	ctx.SetStatusCode(status)
	ctx.SetContentType(fiber.MIMEApplicationJSON)
	ctx.SetBody(envelope(status, msg))
}

// Route reports whether path is route as Fiber matches it by default:
// ignoring case and one trailing slash.
func Route(path []byte, route string) bool {
	if len(path) > 1 && path[len(path)-1] == '/' {
		path = path[:len(path)-1]
	}
	return len(path) == len(route) && strings.EqualFold(string(path), route)
}

// RoutePrefix reports whether path starts with prefix, ignoring case.
func RoutePrefix(path []byte, prefix string) bool {
	return len(path) >= len(prefix) && strings.EqualFold(string(path[:len(prefix)]), prefix)
}

// Outcomes of checkFraming, and the 400's message for each.
const (
	framingOK = iota
	framingDupContentLength
	framingCLAndTE
	framingTransferEncoding
	framingObsFold
)

var framingMessages = [...]string{
	framingOK:               "",
	framingDupContentLength: "malformed HTTP request: more than one Content-Length",
	framingCLAndTE:          "malformed HTTP request: both Content-Length and Transfer-Encoding",
	framingTransferEncoding: "malformed HTTP request: a Transfer-Encoding other than chunked",
	framingObsFold:          "malformed HTTP request: a folded header line",
}

var (
	strContentLength    = []byte("Content-Length")
	strTransferEncoding = []byte("Transfer-Encoding")
	strChunked          = []byte("chunked")
)

// checkFraming refuses what makes a request's length ambiguous between
// this server and a proxy in front of it (RFC 9112 section 6.3): more than
// one Content-Length (even with equal values), Content-Length with
// Transfer-Encoding, a Transfer-Encoding other than one "chunked", and
// obsolete line folding. raw is the header block after the request line.
func checkFraming(raw []byte) int {
	cl, te := 0, 0
	for len(raw) > 0 {
		var line []byte
		if i := bytes.IndexByte(raw, '\n'); i >= 0 {
			line, raw = raw[:i], raw[i+1:]
		} else {
			line, raw = raw, nil
		}
		line = bytes.TrimSuffix(line, []byte{'\r'})
		if len(line) == 0 {
			break
		}
		if line[0] == ' ' || line[0] == '\t' {
			return framingObsFold
		}
		colon := bytes.IndexByte(line, ':')
		if colon < 0 {
			continue // fasthttp refuses it as malformed
		}
		key, value := line[:colon], bytes.TrimSpace(line[colon+1:])
		switch {
		case bytes.EqualFold(key, strContentLength):
			cl++
		case bytes.EqualFold(key, strTransferEncoding):
			te++
			if !bytes.EqualFold(value, strChunked) {
				return framingTransferEncoding
			}
		}
	}
	switch {
	case cl > 1:
		return framingDupContentLength
	case cl > 0 && te > 0:
		return framingCLAndTE
	case te > 1:
		return framingTransferEncoding
	}
	return framingOK
}
