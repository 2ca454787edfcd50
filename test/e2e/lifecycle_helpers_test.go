package e2e

// Helpers for the lifecycle tests: a slow HTTP request that is in flight
// (its body half sent) while the server is told to stop, and waiting for a
// process to exit with its code.

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// slowRequest is an HTTP/1.1 request whose body is sent in two halves, so
// it can be caught in flight: the server has the headers and part of the
// body when the test sends SIGTERM.
type slowRequest struct {
	conn net.Conn
	br   *bufio.Reader
	rest string
}

// startSlowRequest connects, sends the headers and the first half of body.
func startSlowRequest(t *testing.T, addr, method, path, token, body string) *slowRequest {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("slow request: dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	// A request answered first proves the server accepted the connection:
	// one still in the kernel's backlog when the listener closes is reset,
	// which is not the drain under test (it happened on a loaded machine).
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := fmt.Fprintf(c, "GET /healthz HTTP/1.1\r\nHost: %s\r\n\r\n", addr); err != nil {
		t.Fatalf("slow request: healthz: %v", err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("slow request: healthz: %v", err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	_ = c.SetDeadline(time.Time{})
	half := len(body) / 2
	head := fmt.Sprintf("%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n", method, path, addr, len(body))
	if token != "" {
		head += "Authorization: Bearer " + token + "\r\n"
	}
	if _, err := io.WriteString(c, head+"\r\n"+body[:half]); err != nil {
		t.Fatalf("slow request: send first half: %v", err)
	}
	// Until the server has read those bytes, its connection still counts
	// as idle (keep-alive, after the answer above), and a graceful
	// shutdown closes idle connections: with the bytes unread, the close
	// is a reset (fasthttp's closeIdleConns; CI hit it on a loaded machine).
	waitDrained(t, c)
	return &slowRequest{conn: c, br: br, rest: body[half:]}
}

// waitDrained waits until the server's end of c has nothing unread: the
// receive queue of its socket in /proc/net/tcp is empty.
func waitDrained(t *testing.T, c net.Conn) {
	t.Helper()
	server, client := hexAddr(c.RemoteAddr()), hexAddr(c.LocalAddr())
	deadline := time.Now().Add(10 * time.Second)
	for {
		raw, err := os.ReadFile("/proc/net/tcp")
		if err != nil {
			t.Fatalf("slow request: %v", err)
		}
		for _, line := range strings.Split(string(raw), "\n") {
			// sl local_address rem_address st tx_queue:rx_queue ...
			f := strings.Fields(line)
			if len(f) > 4 && f[1] == server && f[2] == client && strings.HasSuffix(f[4], ":00000000") {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("slow request: the server did not read the request's first half within 10s")
		}
		time.Sleep(time.Millisecond)
	}
}

// hexAddr is an IPv4 TCP address as /proc/net/tcp writes it.
func hexAddr(a net.Addr) string {
	ta := a.(*net.TCPAddr)
	ip := ta.IP.To4()
	return fmt.Sprintf("%02X%02X%02X%02X:%04X", ip[3], ip[2], ip[1], ip[0], ta.Port)
}

// finish sends the rest of the body and reads the response. A request the
// server dropped instead of draining shows as an error (reset, EOF).
func (r *slowRequest) finish() (*http.Response, string, error) {
	_ = r.conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(r.conn, r.rest); err != nil {
		return nil, "", fmt.Errorf("send second half: %w", err)
	}
	resp, err := http.ReadResponse(r.br, nil)
	if err != nil {
		return nil, "", fmt.Errorf("read response: %w", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return resp, "", fmt.Errorf("read body: %w", err)
	}
	return resp, string(b), nil
}

// waitExit waits up to d for a process (whose Wait runs elsewhere and closes
// exited) and returns its exit code and how long it took.
func waitExit(t *testing.T, cmd *exec.Cmd, exited <-chan struct{}, d time.Duration, start time.Time) (int, time.Duration) {
	t.Helper()
	select {
	case <-exited:
	case <-time.After(d):
		t.Fatalf("process still running %s after SIGTERM", d)
	}
	return cmd.ProcessState.ExitCode(), time.Since(start)
}

// waitLog polls a log until it contains want.
func waitLog(t *testing.T, d time.Duration, what string, log func() string, want string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !strings.Contains(log(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s (%q in the log)", d, what, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
