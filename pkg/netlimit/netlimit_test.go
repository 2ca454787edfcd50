package netlimit

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// failingListener fails its first n accepts with EMFILE, as accept(2) does
// with a full descriptor table, then accepts from the real listener.
type failingListener struct {
	net.Listener
	n atomic.Int32
}

func (f *failingListener) Accept() (net.Conn, error) {
	if f.n.Add(-1) >= 0 {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: f.Addr(), Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	}
	return f.Listener.Accept()
}

func listen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// TestSecurityAcceptErrorsBackOff: Finding 6: accept() failing with EMFILE
// stopped the daemons. Accept retries with backoff, reports every failure
// and returns the next connection once accept works again.
func TestSecurityAcceptErrorsBackOff(t *testing.T) {
	inner := &failingListener{Listener: listen(t)}
	inner.n.Store(5)
	var failures atomic.Int32
	logs := &records{}
	l := New(inner, Config{Logger: slog.New(logs), AcceptError: func(err error) {
		if !errors.Is(err, syscall.EMFILE) {
			t.Errorf("AcceptError(%v), want EMFILE", err)
		}
		failures.Add(1)
	}})
	go func() {
		if c, err := net.Dial("tcp", l.Addr().String()); err == nil {
			defer c.Close()
			time.Sleep(time.Second)
		}
	}()
	start := time.Now()
	c, err := l.Accept()
	if err != nil {
		t.Fatalf("Accept returned %v; want the connection after the failures", err)
	}
	c.Close()
	if n := failures.Load(); n != 5 {
		t.Fatalf("%d failures reported, want 5", n)
	}
	// Logged once for the burst, once when it ends.
	if got := logs.messages(); len(got) != 2 || got[0] != "accept failed; retrying with backoff" || got[1] != "accepting again" {
		t.Fatalf("logged %q; want one line per burst and one at its end", got)
	}
	// 5+10+20+40+80 ms of backoff: the loop waited rather than spun.
	if d := time.Since(start); d < 150*time.Millisecond {
		t.Fatalf("5 failed accepts took %s: no backoff", d)
	}

	// Closing the listener ends a backoff at once.
	inner.n.Store(1 << 30)
	done := make(chan error, 1)
	go func() { _, err := l.Accept(); done <- err }()
	time.Sleep(50 * time.Millisecond)
	l.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Accept after Close: %v, want net.ErrClosed", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Accept kept retrying after Close")
	}
}

// TestSecurityConnCaps: Finding 6: there was no connection cap. Over
// MaxConns or MaxConnsPerIP a connection is refused (Refuse, then closed),
// an exempt address is held only to MaxConns, and closing a connection
// frees its slot.
func TestSecurityConnCaps(t *testing.T) {
	cases := []struct {
		name         string
		total, perIP int
		exempt       bool
		accepted     int
		reason       error
	}{
		{"total", 3, 0, false, 3, ErrTooManyConns},
		{"per address", 0, 2, false, 2, ErrTooManyConnsPerIP},
		{"per address, exempt", 4, 2, true, 4, ErrTooManyConns},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			var refused []error
			cfg := Config{MaxConns: tc.total, MaxConnsPerIP: tc.perIP, Logger: quiet,
				Refuse: func(c net.Conn, reason error) {
					mu.Lock()
					refused = append(refused, reason)
					mu.Unlock()
					_, _ = c.Write([]byte("refused"))
				}}
			if tc.exempt {
				cfg.Exempt = func(a netip.Addr) bool { return a == netip.MustParseAddr("127.0.0.1") }
			}
			l := New(listen(t), cfg)
			accepted := make(chan net.Conn, 16)
			go func() {
				for {
					c, err := l.Accept()
					if err != nil {
						return
					}
					accepted <- c
				}
			}()
			dial := func() net.Conn {
				c, err := net.Dial("tcp", l.Addr().String())
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { c.Close() })
				return c
			}
			var served []net.Conn
			for range tc.accepted {
				dial()
				select {
				case c := <-accepted:
					served = append(served, c)
				case <-time.After(5 * time.Second):
					t.Fatalf("connection %d within the cap not accepted", len(served)+1)
				}
			}
			over := dial()
			_ = over.SetReadDeadline(time.Now().Add(5 * time.Second))
			b, _ := io.ReadAll(over)
			if string(b) != "refused" {
				t.Fatalf("connection over the cap read %q, want the refusal and EOF", b)
			}
			mu.Lock()
			got := append([]error(nil), refused...)
			mu.Unlock()
			if len(got) != 1 || got[0] != tc.reason {
				t.Fatalf("refused %v, want [%v]", got, tc.reason)
			}
			if n := l.Open(); n != tc.accepted {
				t.Fatalf("Open() = %d, want %d", n, tc.accepted)
			}
			// Closing twice frees one slot, not two.
			served[0].Close()
			served[0].Close()
			if n := l.Open(); n != tc.accepted-1 {
				t.Fatalf("Open() after a close = %d, want %d", n, tc.accepted-1)
			}
			dial()
			select {
			case c := <-accepted:
				c.Close()
			case <-time.After(5 * time.Second):
				t.Fatal("a freed slot was not reused")
			}
			l.Close()
		})
	}
}

// records is a slog.Handler keeping the messages logged.
type records struct {
	mu   sync.Mutex
	msgs []string
}

func (r *records) Enabled(context.Context, slog.Level) bool { return true }
func (r *records) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, rec.Message)
	return nil
}
func (r *records) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *records) WithGroup(string) slog.Handler      { return r }

func (r *records) messages() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.msgs...)
}

// TestAllowAndIsLoopback: Allow refuses by remote address before anything
// is read (the embedded broker's loopback-only mode), reported to Refuse.
func TestAllowAndIsLoopback(t *testing.T) {
	for _, tt := range []struct {
		addr net.Addr
		want bool
	}{
		{&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}, true},
		{&net.TCPAddr{IP: net.IPv4(127, 1, 2, 3)}, true},
		{&net.TCPAddr{IP: net.IPv6loopback}, true},
		{&net.TCPAddr{IP: net.IPv4(10, 0, 0, 1)}, false},
		{&net.TCPAddr{IP: net.ParseIP("::ffff:127.0.0.1")}, true},
		{nil, false},
	} {
		if got := IsLoopback(tt.addr); got != tt.want {
			t.Errorf("IsLoopback(%v) = %v", tt.addr, got)
		}
	}
	inner := listen(t)
	refused := make(chan error, 1)
	l := New(inner, Config{Logger: quiet, Allow: func(net.Addr) bool { return false },
		Refuse: func(_ net.Conn, reason error) { refused <- reason }})
	t.Cleanup(func() { l.Close() })
	go func() { _, _ = l.Accept() }()
	// The reset may already come with the dial.
	if c, err := net.Dial("tcp", inner.Addr().String()); err == nil {
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Fatal("a refused connection was served")
		}
	}
	select {
	case r := <-refused:
		if !errors.Is(r, ErrRefusedRemote) {
			t.Fatalf("reason %v, want ErrRefusedRemote", r)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Refuse was not called")
	}
}

// TestRefusalIsRead: a client over the cap that has already sent its
// request reads the answer Refuse wrote, every time. Closing at once with
// the request unread reset the connection, and the reset could beat the
// answer, or even the client's connect (the flake CI once hit in
// pkg/api's TestSecurityHTTPConnCap).
func TestRefusalIsRead(t *testing.T) {
	inner := listen(t)
	l := New(inner, Config{MaxConns: 1, Logger: quiet,
		Refuse: func(c net.Conn, _ error) {
			_ = c.SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
			_, _ = io.WriteString(c, "busy\n")
		}})
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close() // held: the one slot stays taken
		}
	}()
	held, err := net.Dial("tcp", inner.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	waitOpen(t, l, 1)
	const tries = 200
	for i := range tries {
		c, err := net.Dial("tcp", inner.Addr().String())
		if err != nil {
			t.Fatalf("try %d: dial: %v", i, err)
		}
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		_, _ = io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
		got, err := io.ReadAll(c)
		c.Close()
		if string(got) != "busy\n" {
			t.Fatalf("try %d of %d: read %q (%v), want the refusal", i, tries, got, err)
		}
	}
}

func waitOpen(t *testing.T, l *Listener, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for l.Open() != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d connections open, want %d", l.Open(), n)
		}
		time.Sleep(time.Millisecond)
	}
}
