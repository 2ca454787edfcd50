package api

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/internal/daemontest"
)

// rawAll writes raw on one connection and reads every response until the
// server closes it, checking each against the envelope contract.
func rawAll(t *testing.T, addr, raw string) []*response {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(conn, raw); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	var out []*response
	for {
		hr, err := http.ReadResponse(br, nil)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("no answer and no close after %d responses", len(out))
			}
			return out
		}
		r := &response{status: hr.StatusCode, header: hr.Header}
		if hr.Close {
			// ReadResponse consumes the header into hr.Close.
			r.header.Set("Connection", "close")
		}
		r.body, _ = io.ReadAll(hr.Body)
		hr.Body.Close()
		checkEnvelope(t, req{method: "RAW", path: raw}, r)
		out = append(out, r)
	}
}

// TestSecurityHTTPSmuggling: Low finding "HTTP parsing": a duplicate
// Content-Length was accepted, and a request with both Content-Length and
// Transfer-Encoding was processed with a request smuggled behind it
// executed. Here the hidden request writes desired state, which publishes
// a downlink: it must never run.
func TestSecurityHTTPSmuggling(t *testing.T) {
	e := newEnv(t)
	e.seed("dev-a", 1)
	tok := e.token("root")
	body := `{"state":{"smuggled":1}}`
	hidden := fmt.Sprintf("PUT /api/v1/devices/dev-a/desired HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"+
		"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", tok, len(body), body)
	login := "POST " + loginPath + " HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
	addr := strings.TrimPrefix(e.base, "http://")
	cases := []struct{ name, raw string }{
		{"CL and TE", login + fmt.Sprintf("Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 5+len(hidden)) + hidden},
		{"TE and CL", login + "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n" + hidden},
		{"duplicate CL", login + fmt.Sprintf("Content-Length: %d\r\nContent-Length: 0\r\n\r\n", len(hidden)) + hidden},
		{"duplicate CL, equal", login + "Content-Length: 0\r\nContent-Length: 0\r\n\r\n" + hidden},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := rawAll(t, addr, tc.raw)
			if len(got) != 1 || got[0].status != 400 || got[0].header.Get("Connection") != "close" ||
				!strings.HasPrefix(got[0].env.Message, "malformed HTTP request") {
				t.Fatalf("answers %v; want one 400 that closes the connection", got)
			}
			if pubs := e.downlink.all(); len(pubs) != 0 {
				t.Fatalf("the smuggled desired write ran: %d downlink publishes", len(pubs))
			}
		})
	}
	// The same request pipelined behind a well-framed one runs: the test
	// sees a smuggled request when it executes.
	got := rawAll(t, addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"+strings.Replace(hidden, "Host: x\r\n", "Host: x\r\nConnection: close\r\n", 1))
	if len(got) != 2 || got[1].status != 200 || len(e.downlink.all()) != 1 {
		t.Fatalf("pipelined write: answers %v, %d publishes; want it to run", got, len(e.downlink.all()))
	}
}

// TestSecurityHTTPNoEcho: Low finding "HTTP parsing": fasthttp's 400 for a
// malformed request echoed the raw request, Authorization header included.
func TestSecurityHTTPNoEcho(t *testing.T) {
	e := newEnv(t)
	tok := e.token("root")
	for _, raw := range []string{
		"GET /api/v1/edge HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + tok + "\r\nBad Header: 1\r\n\r\n",
		"POST " + loginPath + " HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + tok + "\r\nContent-Length: 1x\r\n\r\n",
	} {
		got := rawAll(t, strings.TrimPrefix(e.base, "http://"), raw)
		if len(got) != 1 || got[0].status != 400 {
			t.Fatalf("answers %v; want one 400", got)
		}
		if strings.Contains(string(got[0].body), tok[:20]) || got[0].env.Message != "malformed HTTP request" {
			t.Fatalf("400 body %s: want the fixed message, never the request", got[0].body)
		}
	}
}

// emfileListener fails its first n accepts with EMFILE, as accept(2) does
// with a full descriptor table.
type emfileListener struct {
	net.Listener
	n atomic.Int32
}

func (l *emfileListener) Accept() (net.Conn, error) {
	if l.n.Add(-1) >= 0 {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.Addr(), Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	}
	return l.Listener.Accept()
}

// serveOn runs a second API server over e's parts on ln, with cfg, and
// returns its registry.
func serveOn(t *testing.T, e *testEnv, ln net.Listener, cfg Config) (*prometheus.Registry, <-chan error) {
	t.Helper()
	reg := prometheus.NewRegistry()
	cfg.EdgeID, cfg.Logger = "edge-1", slog.New(slog.NewTextHandler(io.Discard, nil))
	srv, err := New(cfg, Deps{Store: e.store, Tokens: e.tokens, Policy: e.engine, Registerer: reg, Gatherer: reg})
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
	})
	return reg, served
}

// TestSecurityHTTPAcceptErrors: Finding 6: the edge exited (code 1, no
// reason logged) when accept() failed with EMFILE. Serve keeps serving,
// and the failures are counted.
func TestSecurityHTTPAcceptErrors(t *testing.T) {
	e := newEnv(t)
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := &emfileListener{Listener: inner}
	ln.n.Store(5)
	reg, served := serveOn(t, e, ln, Config{})
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Get("http://" + inner.Addr().String() + "/healthz")
	if err != nil {
		t.Fatalf("after failed accepts: %v", err)
	}
	resp.Body.Close()
	select {
	case err := <-served:
		t.Fatalf("Serve returned %v on failed accepts; want it serving", err)
	default:
	}
	if got := daemontest.Metric(t, reg, "outpost_http_accept_errors_total"); got != 5 {
		t.Fatalf("outpost_http_accept_errors_total = %v, want 5", got)
	}
}

// TestSecurityHTTPConnCap: Finding 6: there was no connection cap. Over
// api.max_conns (or max_conns_per_ip) a connection is answered 503 (429)
// and closed; the connections being served are unaffected.
func TestSecurityHTTPConnCap(t *testing.T) {
	e := newEnv(t)
	for _, tc := range []struct {
		name   string
		cfg    Config
		status int
		reason string
	}{
		{"total", Config{MaxConns: 2, MaxConnsPerIP: 2}, 503, "max_conns"},
		{"per address", Config{MaxConns: 10, MaxConnsPerIP: 2}, 429, "max_conns_per_ip"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			reg, _ := serveOn(t, e, ln, tc.cfg)
			addr := ln.Addr().String()
			var held []net.Conn
			for range 2 {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				// A request answered proves the connection was accepted
				// (and counted) before the next is dialled.
				fmt.Fprint(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
				resp, err := http.ReadResponse(bufio.NewReader(c), nil)
				if err != nil || resp.StatusCode != 200 {
					t.Fatalf("connection within the cap: %v", err)
				}
				resp.Body.Close()
				held = append(held, c)
			}
			got := rawAll(t, addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
			if len(got) != 1 || got[0].status != tc.status {
				t.Fatalf("connection over the cap: %v; want one %d", got, tc.status)
			}
			if v := daemontest.Metric(t, reg, "outpost_http_connections_refused_total", "reason", tc.reason); v != 1 {
				t.Fatalf("outpost_http_connections_refused_total{reason=%s} = %v, want 1", tc.reason, v)
			}
			// Closing one frees its slot.
			held[0].Close()
			deadline := time.Now().Add(5 * time.Second)
			for {
				if got := rawAll(t, addr, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"); len(got) == 1 && got[0].status == 200 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("a closed connection's slot was not freed")
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
}

// TestTrustedProxies: behind a configured trusted proxy the client is
// X-Forwarded-For's rightmost untrusted address, so each client has its
// own rate limit; from any other peer the header is ignored.
func TestTrustedProxies(t *testing.T) {
	for _, tc := range []struct {
		name    string
		proxies []string
		limited bool
	}{
		{"trusted", []string{"127.0.0.0/8"}, false},
		{"not trusted", nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, withConfig(func(c *Config) { c.RateLimitPerIP = 1; c.TrustedProxies = tc.proxies }))
			limited := 0
			for i := range 10 {
				// A spoofed first hop, then the address the proxy saw.
				xff := fmt.Sprintf("198.51.100.1, 203.0.113.%d", i+1)
				r := e.do(req{path: "/api/v1/edge", header: map[string]string{"X-Forwarded-For": xff}})
				if r.status == 429 {
					limited++
				}
			}
			if (limited > 0) != tc.limited {
				t.Fatalf("%d of 10 requests from 10 clients limited; want limited=%v", limited, tc.limited)
			}
		})
	}
}
