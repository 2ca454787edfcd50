package httpguard

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/valyala/fasthttp"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// testApp is a guarded app on a real listener: POST /count has a visible
// side effect (it counts its calls), GET /ip answers c.IP(), and /small
// takes at most 16 bytes of body.
type testApp struct {
	addr  string
	calls atomic.Int32
	guard *Guard
	reg   *prometheus.Registry
}

func newTestApp(t *testing.T, proxies ...string) *testApp {
	t.Helper()
	ta := &testApp{reg: prometheus.NewRegistry()}
	g, err := New(Config{
		BodyLimit: func(_, path []byte, _ *fasthttp.RequestHeader) int {
			if Route(path, "/small") {
				return 16
			}
			return 1 << 10
		},
		TrustedProxies: proxies, Registerer: ta.reg, Logger: quiet,
	})
	if err != nil {
		t.Fatal(err)
	}
	ta.guard = g
	ta.addr = serve(t, g.App(fiber.Config{DisableStartupMessage: true, BodyLimit: 1 << 20}), g.Listener, &ta.calls)
	return ta
}

// serve routes app and serves it on a loopback listener wrapped by wrap.
func serve(t *testing.T, app *fiber.App, wrap func(net.Listener) net.Listener, calls *atomic.Int32) string {
	t.Helper()
	app.Post("/count", func(c *fiber.Ctx) error {
		calls.Add(1)
		return c.JSON(fiber.Map{"code": 0, "message": "ok", "data": len(c.Body())})
	})
	app.Post("/small", func(c *fiber.Ctx) error {
		return c.JSON(fiber.Map{"code": 0, "message": "ok", "data": len(c.Body())})
	})
	app.Get("/ip", func(c *fiber.Ctx) error { return c.SendString(c.IP()) })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = app.Listener(wrap(ln)) }()
	t.Cleanup(func() {
		_ = app.Shutdown()
		ln.Close()
		<-done
	})
	return ln.Addr().String()
}

// unguarded is the same routes on plain Fiber: what the daemons ran
// before, to show each attack works without the guard.
func unguarded(t *testing.T) (addr string, calls *atomic.Int32) {
	t.Helper()
	calls = new(atomic.Int32)
	id := func(ln net.Listener) net.Listener { return ln }
	return serve(t, fiber.New(fiber.Config{DisableStartupMessage: true, BodyLimit: 1 << 20}), id, calls), calls
}

type answer struct {
	status int
	body   string
	close  bool
}

// exchange writes raw on one connection and reads every response until
// the server closes it.
func exchange(t *testing.T, addr, raw string) []answer {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	var out []answer
	for {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("the server neither answered nor closed the connection after %d responses", len(out))
			}
			return out
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		out = append(out, answer{status: resp.StatusCode, body: string(b), close: resp.Close})
	}
}

// smuggled is a request hidden behind the first on the same connection.
const smuggled = "POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"

// TestSecurityFraming: Low finding "HTTP parsing": a duplicate
// Content-Length was accepted, and a request with both Content-Length and
// Transfer-Encoding was processed with a request smuggled behind it
// executed. Each ambiguous framing is answered 400 and the connection
// closed, so neither it nor the request hidden behind it runs.
func TestSecurityFraming(t *testing.T) {
	ta := newTestApp(t)
	head := "POST /count HTTP/1.1\r\nHost: x\r\n"
	cases := []struct {
		name, raw string
	}{
		{"CL then TE", head + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled},
		{"TE then CL", head + "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n" + smuggled},
		{"CL and TE identity", head + "Content-Length: 5\r\nTransfer-Encoding: identity\r\n\r\n" + smuggled},
		{"duplicate CL, different", head + "Content-Length: 0\r\nContent-Length: 54\r\n\r\n" + smuggled},
		{"duplicate CL, equal", head + "Content-Length: 54\r\nContent-Length: 54\r\n\r\n" + smuggled},
		{"duplicate CL, case", head + "content-length: 54\r\nCONTENT-LENGTH: 54\r\n\r\n" + smuggled},
		{"TE twice", head + "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled},
		{"TE not chunked", head + "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n" + smuggled},
		{"TE list", head + "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n" + smuggled},
		{"bare LF lines", "POST /count HTTP/1.1\nHost: x\nContent-Length: 5\nTransfer-Encoding: chunked\n\n0\r\n\r\n" + smuggled},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			before := ta.calls.Load()
			got := exchange(t, ta.addr, tc.raw)
			if len(got) != 1 || got[0].status != 400 || !got[0].close {
				t.Fatalf("responses %+v; want one 400 with Connection: close", got)
			}
			var env struct {
				Code    int             `json:"code"`
				Message string          `json:"message"`
				Data    json.RawMessage `json:"data"`
			}
			if err := json.Unmarshal([]byte(got[0].body), &env); err != nil || env.Code != 400 ||
				!strings.HasPrefix(env.Message, "malformed HTTP request") || string(env.Data) != "null" {
				t.Fatalf("body %q is not the 400 envelope", got[0].body)
			}
			if n := ta.calls.Load() - before; n != 0 {
				t.Fatalf("%d requests executed; want none (the hidden one least of all)", n)
			}
		})
	}
	// fasthttp (since 1.52) refuses some of these itself, before the guard's
	// header hook sees them: those count as malformed. Every one is counted
	// once, either way.
	framing, malformed := value(ta.guard.reqsRefused.WithLabelValues("framing")), value(ta.guard.reqsRefused.WithLabelValues("malformed"))
	if framing+malformed != float64(len(cases)) || framing == 0 {
		t.Errorf("outpost_http_requests_refused_total{reason=framing} = %v and {reason=malformed} = %v, want %d in all, framing among them",
			framing, malformed, len(cases))
	}

	// Well-framed requests, pipelined, all run: the harness sees a hidden
	// request when it executes.
	t.Run("well framed", func(t *testing.T) {
		before := ta.calls.Load()
		raw := head + "Content-Length: 2\r\n\r\nhi" + head + "Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n" + smuggled +
			"GET /ip HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
		got := exchange(t, ta.addr, raw)
		if len(got) != 4 || got[0].status != 200 || got[1].status != 200 || got[2].status != 200 || ta.calls.Load()-before != 3 {
			t.Fatalf("responses %+v, %d calls; want 4 answers and 3 calls", got, ta.calls.Load()-before)
		}
	})
	// What the daemons did before: fasthttp reads the chunked body, then
	// runs the hidden request.
	t.Run("unguarded", func(t *testing.T) {
		addr, calls := unguarded(t)
		exchange(t, addr, cases[0].raw+"GET /ip HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
		if calls.Load() != 2 {
			t.Fatalf("plain fasthttp ran %d requests; the test expects it to run the smuggled one", calls.Load())
		}
	})
}

// TestSecurityNoEcho: Low finding "HTTP parsing": fasthttp's 400 for a
// request it cannot parse echoed the raw request, Authorization header
// included. The guard's answer is a fixed envelope.
func TestSecurityNoEcho(t *testing.T) {
	const secret = "Bearer SECRET-TOKEN-MUST-NOT-ECHO"
	raws := []string{
		"GET /ip HTTP/1.1\r\nHost: x\r\nAuthorization: " + secret + "\r\nBad Header: x\r\n\r\n",
		"GET /ip HTTP/1.1\r\nHost: x\r\nAuthorization: " + secret + "\r\nContent-Length: abc\r\n\r\n",
	}
	ta := newTestApp(t)
	for i, raw := range raws {
		got := exchange(t, ta.addr, raw)
		if len(got) != 1 || got[0].status != 400 {
			t.Fatalf("request %d: responses %+v; want one 400", i, got)
		}
		if want := `{"code":400,"message":"malformed HTTP request","data":null}`; got[0].body != want {
			t.Fatalf("request %d: body %q, want %q", i, got[0].body, want)
		}
	}
	addr, _ := unguarded(t)
	if got := exchange(t, addr, raws[0]); len(got) != 1 || !strings.Contains(got[0].body, "SECRET") {
		t.Fatalf("plain Fiber answered %+v; the test expects it to echo the header", got)
	}
}

// TestBodyLimitBeforeReading: the limit BodyLimit picks for a request
// applies to a declared length before the body is read, and to a chunked
// body while it is read, with the shared 413 message.
func TestBodyLimitBeforeReading(t *testing.T) {
	ta := newTestApp(t)
	cases := []struct {
		name, raw string
		status    int
	}{
		{"within", "POST /small HTTP/1.1\r\nHost: x\r\nContent-Length: 16\r\nConnection: close\r\n\r\n0123456789abcdef", 200},
		// No body follows: only the declared length is refused.
		{"declared over", "POST /small HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n", 413},
		{"declared huge", "POST /small HTTP/1.1\r\nHost: x\r\nContent-Length: 1099511627776\r\n\r\n", 413},
		{"chunked over", "POST /small HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789abcdef\r\n1\r\nx\r\n0\r\n\r\n", 413},
		{"other route", "POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\nConnection: close\r\n\r\n0123456789abcdefg", 200},
		{"other route over", "POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 1025\r\n\r\n", 413},
		{"path not normalised", "POST /x/../SMALL/ HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n", 413},
		{"path encoded", "POST /%73mall?q=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n", 413},
		{"absolute form", "POST http://x/small HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n", 413},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := exchange(t, ta.addr, tc.raw)
			if len(got) != 1 || got[0].status != tc.status {
				t.Fatalf("responses %+v; want one %d", got, tc.status)
			}
			if tc.status == 413 && !strings.Contains(got[0].body, "request body too large: at most") {
				t.Fatalf("413 body %q", got[0].body)
			}
		})
	}
}

// TestTrustedProxies: X-Forwarded-For names the client only when the peer
// is a trusted proxy, and then it is the rightmost untrusted hop, so a
// client cannot pick its address by sending the header itself.
func TestTrustedProxies(t *testing.T) {
	g, err := New(Config{TrustedProxies: []string{"10.0.0.0/8", "127.0.0.1", "::ffff:192.168.1.1"}, Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	peer := netip.MustParseAddr("127.0.0.1")
	cases := []struct {
		xff  []string
		want string
	}{
		{nil, "127.0.0.1"},
		{[]string{"203.0.113.7"}, "203.0.113.7"},
		{[]string{"6.6.6.6, 203.0.113.7"}, "203.0.113.7"},
		{[]string{"203.0.113.7, 10.1.2.3"}, "203.0.113.7"},
		{[]string{"6.6.6.6", "203.0.113.7, 10.1.2.3"}, "203.0.113.7"},
		{[]string{"10.0.0.5, 10.0.0.6"}, "10.0.0.5"},
		{[]string{"not-an-ip, 10.0.0.6"}, "10.0.0.6"},
		{[]string{"203.0.113.7, 192.168.1.1"}, "203.0.113.7"},
		{[]string{"[2001:db8::1]:443"}, "2001:db8::1"},
		{[]string{"203.0.113.7:5000"}, "203.0.113.7"},
		{[]string{""}, "127.0.0.1"},
	}
	for _, tc := range cases {
		var hs [][]byte
		for _, h := range tc.xff {
			hs = append(hs, []byte(h))
		}
		if got := g.clientIP(peer, hs).String(); got != tc.want {
			t.Errorf("X-Forwarded-For %q: client %s, want %s", tc.xff, got, tc.want)
		}
	}
	if _, err := ParseTrustedProxies([]string{"10.0.0.0/33"}); err == nil {
		t.Error("a bad CIDR parsed")
	}
	if _, err := ParseTrustedProxies([]string{"proxy.example"}); err == nil {
		t.Error("a host name parsed as a trusted proxy")
	}

	ip := func(addr, xff string) string {
		t.Helper()
		got := exchange(t, addr, "GET /ip HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: "+xff+"\r\n"+HeaderClientIP+": 6.6.6.6\r\nConnection: close\r\n\r\n")
		if len(got) != 1 {
			t.Fatalf("responses %+v", got)
		}
		return got[0].body
	}
	if got := ip(newTestApp(t, "127.0.0.1").addr, "6.6.6.6, 203.0.113.7"); got != "203.0.113.7" {
		t.Errorf("through a trusted proxy: c.IP() = %q, want 203.0.113.7", got)
	}
	if got := ip(newTestApp(t).addr, "203.0.113.7"); got != "127.0.0.1" {
		t.Errorf("from an untrusted peer: c.IP() = %q, want the peer 127.0.0.1", got)
	}
}

// TestSecurityAcceptErrorsCounted: Finding 6: the guard's listener keeps
// serving through failed accepts and counts them.
func TestSecurityAcceptErrorsCounted(t *testing.T) {
	g, err := New(Config{Registerer: prometheus.NewRegistry(), Logger: quiet})
	if err != nil {
		t.Fatal(err)
	}
	var calls atomic.Int32
	flaky := func(ln net.Listener) net.Listener { return g.Listener(&emfileListener{Listener: ln, n: 3}) }
	addr := serve(t, g.App(fiber.Config{DisableStartupMessage: true}), flaky, &calls)
	if got := exchange(t, addr, smuggled+"GET /ip HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"); len(got) != 2 || got[0].status != 200 {
		t.Fatalf("after failed accepts: %+v", got)
	}
	if n := value(g.acceptErrors); n != 3 {
		t.Fatalf("outpost_http_accept_errors_total = %v, want 3", n)
	}
}

type emfileListener struct {
	net.Listener
	n int // accessed by the accept loop only
}

func (l *emfileListener) Accept() (net.Conn, error) {
	if l.n > 0 {
		l.n--
		return nil, fmt.Errorf("accept: %w", errEMFILE)
	}
	return l.Listener.Accept()
}

var errEMFILE = errors.New("too many open files")

// value reads a counter.
func value(c prometheus.Counter) float64 {
	var m dto.Metric
	_ = c.Write(&m)
	return m.GetCounter().GetValue()
}
