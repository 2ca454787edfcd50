package httpapi

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/internal/daemontest"
	"github.com/outpost-edge/outpost/pkg/cloud/auth"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// serving is a server on a real listener with its registry.
type serving struct {
	*Server
	addr   string
	reg    *prometheus.Registry
	served chan error
}

// serveReal builds a server over f and serves it (Serve) on ln, or on a
// new loopback listener when ln is nil.
func serveReal(t *testing.T, f *fakeService, cfg Config, ln net.Listener) *serving {
	t.Helper()
	static, err := auth.NewStatic(map[string]string{"e1": edgeToken}, apiToken)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.NodeID == "" {
		cfg.NodeID = "n1"
	}
	reg := prometheus.NewRegistry()
	cfg.HasAPIToken = true
	s, err := New(cfg, f, auth.Chain{static, users{}}, slog.New(slog.NewTextHandler(io.Discard, nil)), reg)
	if err != nil {
		t.Fatal(err)
	}
	if ln == nil {
		if ln, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
	}
	sv := &serving{Server: s, addr: ln.Addr().String(), reg: reg, served: make(chan error, 1)}
	go func() { sv.served <- s.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = s.Shutdown(ctx)
		ln.Close()
	})
	return sv
}

// exchange writes raw on one connection and reads every answer until the
// server closes it.
func exchange(t *testing.T, addr, raw string) []answer {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
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
				t.Fatalf("no answer and no close after %d answers", len(out))
			}
			return out
		}
		a := answer{status: resp.StatusCode, header: resp.Header}
		if resp.Close {
			// ReadResponse consumes the header into resp.Close.
			a.header.Set("Connection", "close")
		}
		a.raw, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		_ = json.Unmarshal(a.raw, &a.env)
		out = append(out, a)
	}
}

// TestSecurityBodyBeforeAuth: Finding 7: cloud-sync buffered up to 64 MB
// of request body on every route before authentication; 30 connections
// took it to 1.9 GB. Thirty concurrent unauthenticated 64 MB uploads (a
// declared length or chunked; no token, a wrong one, the API token on the
// sync routes, an edge token on a route that takes no batch) are refused
// early and the heap barely grows.
func TestSecurityBodyBeforeAuth(t *testing.T) {
	f := &fakeService{}
	sv := serveReal(t, f, Config{}, nil)
	const size = 64 << 20
	type upload struct{ path, token string }
	kinds := []upload{
		{"/sync/v1/push", ""}, {"/sync/v1/push", "not-a-token"}, {"/sync/v1/state", apiToken},
		{"/sync/v1/heartbeat", edgeToken}, {"/api/v1/auth/login", ""}, {"/cluster/v1/join", ""},
		{"/api/v1/devices/d1/desired", ""}, {"/api/v1/policies/p.rego", ""}, {"/nowhere", ""}, {"/sync/v1/push", adminJWT},
	}

	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapAlloc
	const bound, abort = 32 << 20, 256 << 20
	var peak atomic.Uint64
	var mu sync.Mutex
	var conns []net.Conn
	stop := make(chan struct{})
	monitorDone := make(chan struct{})
	go func() {
		defer close(monitorDone)
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			if ms.HeapAlloc > base && ms.HeapAlloc-base > peak.Load() {
				peak.Store(ms.HeapAlloc - base)
			}
			if peak.Load() > abort {
				// The server is buffering the bodies: cut the uploads
				// rather than let this test take gigabytes.
				mu.Lock()
				for _, c := range conns {
					c.Close()
				}
				mu.Unlock()
			}
		}
	}()

	chunk := bytes.Repeat([]byte("x"), 64<<10)
	chunkHead := []byte(fmt.Sprintf("%x\r\n", len(chunk)))
	type result struct {
		kind    upload
		chunked bool
		status  int
		sent    int
	}
	results := make([]result, 30)
	var wg sync.WaitGroup
	for i := range results {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			k := kinds[i%len(kinds)]
			r := result{kind: k, chunked: i%2 == 1}
			defer func() { results[i] = r }()
			c, err := net.Dial("tcp", sv.addr)
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			_ = c.SetDeadline(time.Now().Add(60 * time.Second))
			hdr := "POST " + k.path + " HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
			if k.token != "" {
				hdr += "Authorization: Bearer " + k.token + "\r\n"
			}
			if r.chunked {
				hdr += "Transfer-Encoding: chunked\r\n\r\n"
			} else {
				hdr += fmt.Sprintf("Content-Length: %d\r\n\r\n", size)
			}
			statusc := make(chan int, 1)
			go func() {
				resp, err := http.ReadResponse(bufio.NewReader(c), nil)
				if err != nil {
					statusc <- 0 // reset before the answer could be read
					return
				}
				resp.Body.Close()
				statusc <- resp.StatusCode
			}()
			if _, err := io.WriteString(c, hdr); err != nil {
				return
			}
			for r.sent < size {
				if r.chunked {
					if _, err := c.Write(chunkHead); err != nil {
						break
					}
				}
				n, err := c.Write(chunk)
				r.sent += n
				if err != nil {
					break
				}
				if r.chunked {
					if _, err := c.Write([]byte("\r\n")); err != nil {
						break
					}
				}
			}
			if r.sent >= size && r.chunked {
				_, _ = io.WriteString(c, "0\r\n\r\n")
			}
			r.status = <-statusc
		}(i)
	}
	wg.Wait()
	close(stop)
	<-monitorDone

	if p := peak.Load(); p > bound {
		t.Fatalf("heap grew by %d MiB under 30 unauthenticated uploads; want under %d MiB", p>>20, bound>>20)
	}
	for _, r := range results {
		// The server stops reading: the client cannot send the whole body
		// (a few MiB fit the socket buffers), and any answer it reads is
		// the 413.
		if r.sent >= size || (r.status != 0 && r.status != 413) {
			t.Errorf("%s (token %q, chunked %v): sent %d MiB, answer %d; want refused early with 413",
				r.kind.path, r.kind.token, r.chunked, r.sent>>20, r.status)
		}
	}
	if calls := f.Calls(); len(calls) != 0 {
		t.Errorf("the service was called: %v", calls)
	}
	t.Logf("peak heap growth %d KiB", peak.Load()>>10)
}

// TestEdgeTokenLiftsBodyLimit: only a sync push or state batch bearing an
// edge's token may be larger than the small limit.
func TestEdgeTokenLiftsBodyLimit(t *testing.T) {
	readings := strings.Repeat(`{"ts":1,"metrics":{"v":1}},`, 40000)
	big := []byte(`{"edge":"e1","first_seq":3,"changes":[{"kind":"readings","device":"d1","readings":[` +
		readings[:len(readings)-1] + `]}]}`)
	if len(big) < 1<<20 {
		t.Fatalf("body of %d bytes; the test wants one over 1 MiB", len(big))
	}
	small := wire.BodyTooLarge(wire.MaxRequestBytes).Error()
	cases := []struct {
		name, path, token string
		status            int
		msg               string
	}{
		{"edge token", "/sync/v1/push", edgeToken, 200, ""},
		{"edge token, path case", "/SYNC/v1/push/", edgeToken, 200, ""},
		{"API token", "/sync/v1/push", apiToken, 413, small},
		{"admin user", "/sync/v1/push", adminJWT, 413, small},
		{"no token", "/sync/v1/push", "", 413, small},
		{"edge token, other sync route", "/sync/v1/heartbeat", edgeToken, 413, small},
		{"edge token, consumer route", "/api/v1/devices/d1/desired", edgeToken, 413, small},
	}
	sv := serveReal(t, &fakeService{}, Config{}, nil)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.status == 200 {
				s := newServer(t, &fakeService{}, Config{})
				if a := call(t, s, "POST", tc.path, tc.token, big); a.status != 200 {
					t.Fatalf("%d %s", a.status, a.raw)
				}
				return
			}
			// Refused on the declared length: only the header is sent
			// (app.Test cannot show a refusal while the body is read).
			raw := fmt.Sprintf("POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n", tc.path, len(big))
			if tc.token != "" {
				raw += "Authorization: Bearer " + tc.token + "\r\n"
			}
			got := exchange(t, sv.addr, raw+"\r\n")
			if len(got) != 1 {
				t.Fatalf("answers %+v", got)
			}
			got[0].wantError(t, tc.status, tc.msg)
		})
	}
}

// TestSecurityHTTPSmuggling: Low finding "HTTP parsing": a duplicate
// Content-Length was accepted, and a request with both Content-Length and
// Transfer-Encoding was processed with a request smuggled behind it
// executed. The hidden request here is an edge's heartbeat: the service
// must never see it.
func TestSecurityHTTPSmuggling(t *testing.T) {
	f := &fakeService{}
	sv := serveReal(t, f, Config{}, nil)
	body := `{"edge":"e1","backlog":0}`
	hidden := fmt.Sprintf("POST /sync/v1/heartbeat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"+
		"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", edgeToken, len(body), body)
	login := "POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
	for _, tc := range []struct{ name, raw string }{
		{"CL and TE", login + fmt.Sprintf("Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 5+len(hidden)) + hidden},
		{"TE and CL", login + "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n" + hidden},
		{"duplicate CL", login + fmt.Sprintf("Content-Length: %d\r\nContent-Length: 0\r\n\r\n", len(hidden)) + hidden},
		{"duplicate CL, equal", login + "Content-Length: 0\r\nContent-Length: 0\r\n\r\n" + hidden},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := exchange(t, sv.addr, tc.raw)
			if len(got) != 1 || got[0].status != 400 || got[0].env.Code != 400 ||
				!strings.HasPrefix(got[0].env.Message, "malformed HTTP request") || got[0].header.Get("Connection") != "close" {
				t.Fatalf("answers %+v; want one 400 envelope that closes the connection", got)
			}
			if calls := f.Calls(); len(calls) != 0 {
				t.Fatalf("the service ran %v", calls)
			}
		})
	}
	// Behind a well-framed request the same one runs: the test sees it.
	got := exchange(t, sv.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"+strings.Replace(hidden, "Host: x\r\n", "Host: x\r\nConnection: close\r\n", 1))
	if len(got) != 2 || got[1].status != 200 || !slices.Equal(f.Calls(), []string{"Heartbeat"}) {
		t.Fatalf("pipelined heartbeat: %+v, calls %v", got, f.Calls())
	}
}

// TestSecurityHTTPNoEcho: Low finding "HTTP parsing": fasthttp's 400 for a
// malformed request echoed the raw request, Authorization header included.
func TestSecurityHTTPNoEcho(t *testing.T) {
	sv := serveReal(t, &fakeService{}, Config{}, nil)
	for _, raw := range []string{
		"GET /api/v1/edges HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + apiToken + "\r\nBad Header: 1\r\n\r\n",
		"POST /sync/v1/push HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + edgeToken + "\r\nContent-Length: 1x\r\n\r\n",
	} {
		got := exchange(t, sv.addr, raw)
		if len(got) != 1 || got[0].status != 400 || got[0].env.Message != "malformed HTTP request" ||
			bytes.Contains(got[0].raw, []byte("token")) {
			t.Fatalf("answers %+v; want one 400 with the fixed message", got)
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

// TestSecurityHTTPAcceptErrors: Finding 6: cloud-sync exited (code 1, no
// reason logged) when accept() failed with EMFILE. Serve keeps serving,
// and the failures are counted.
func TestSecurityHTTPAcceptErrors(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := &emfileListener{Listener: inner}
	ln.n.Store(5)
	sv := serveReal(t, &fakeService{}, Config{}, ln)
	got := exchange(t, sv.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
	if len(got) != 1 || got[0].status != 200 {
		t.Fatalf("after failed accepts: %+v", got)
	}
	select {
	case err := <-sv.served:
		t.Fatalf("Serve returned %v on failed accepts; want it serving", err)
	default:
	}
	if v := daemontest.Metric(t, sv.reg, "outpost_http_accept_errors_total"); v != 5 {
		t.Fatalf("outpost_http_accept_errors_total = %v, want 5", v)
	}
}

// TestSecurityHTTPConnCap: Finding 6: there was no connection cap.
func TestSecurityHTTPConnCap(t *testing.T) {
	sv := serveReal(t, &fakeService{}, Config{MaxConns: 8, MaxConnsPerIP: 2}, nil)
	for range 2 {
		c, err := net.Dial("tcp", sv.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprint(c, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("connection within the cap: %v", err)
		}
		resp.Body.Close()
	}
	got := exchange(t, sv.addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
	if len(got) != 1 || got[0].status != 429 || got[0].env.Code != 429 {
		t.Fatalf("third connection from one address: %+v; want one 429", got)
	}
	if v := daemontest.Metric(t, sv.reg, "outpost_http_connections_refused_total", "reason", "max_conns_per_ip"); v != 1 {
		t.Fatalf("outpost_http_connections_refused_total{reason=max_conns_per_ip} = %v, want 1", v)
	}
}
