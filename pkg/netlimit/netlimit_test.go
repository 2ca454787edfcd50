package netlimit

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// flaky is a listener whose first n Accepts fail with err.
type flaky struct {
	net.Listener
	mu  sync.Mutex
	n   int
	err error
}

func (f *flaky) Accept() (net.Conn, error) {
	f.mu.Lock()
	if f.n > 0 {
		f.n--
		f.mu.Unlock()
		return nil, f.err
	}
	f.mu.Unlock()
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

func dial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestSecurityAcceptErrorsBackOff: accept errors such as EMFILE are
// counted and retried; Accept returns the next good connection.
// Finding 6: EMFILE on accept ended the accept loop and the daemon.
func TestSecurityAcceptErrorsBackOff(t *testing.T) {
	for _, errno := range []error{syscall.EMFILE, syscall.ENFILE, syscall.ECONNABORTED, errors.New("some permanent-looking error")} {
		inner := listen(t)
		var counted atomic.Int32
		l := Wrap(&flaky{Listener: inner, n: 5, err: &net.OpError{Op: "accept", Net: "tcp", Err: errno}},
			Config{OnAcceptError: func(error) { counted.Add(1) }, MinBackoff: time.Millisecond, MaxBackoff: 4 * time.Millisecond})
		dial(t, inner.Addr().String())
		c, err := l.Accept()
		if err != nil {
			t.Fatalf("%v: Accept = %v, want the connection after the errors", errno, err)
		}
		c.Close()
		if counted.Load() != 5 {
			t.Fatalf("%v: %d accept errors counted, want 5", errno, counted.Load())
		}
	}
}

// TestCloseStopsAccept: Close ends an Accept that is backing off, with
// net.ErrClosed.
func TestCloseStopsAccept(t *testing.T) {
	l := Wrap(&flaky{Listener: listen(t), n: 1 << 30, err: syscall.EMFILE}, Config{MinBackoff: 50 * time.Millisecond})
	done := make(chan error, 1)
	go func() { _, err := l.Accept(); done <- err }()
	time.Sleep(20 * time.Millisecond) // let it back off: there is no state to poll
	l.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Accept after Close = %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Accept did not return after Close")
	}
}

// TestSecurityConnCap: the connection over MaxConns is closed unread and
// reported; closing an accepted one frees its slot.
// Finding 6: there was no connection cap.
func TestSecurityConnCap(t *testing.T) {
	inner := listen(t)
	var refused atomic.Int32
	l := Wrap(inner, Config{MaxConns: 2, OnRefuse: func(_ net.Addr, reason string) {
		if reason == RefusedCap {
			refused.Add(1)
		}
	}})
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	t.Cleanup(func() { l.Close() })
	var got []net.Conn
	for range 2 {
		dial(t, inner.Addr().String())
		got = append(got, <-accepted)
	}
	if err := refusedConn(inner.Addr().String()); err != nil {
		t.Fatalf("connection over the cap: %v", err)
	}
	if refused.Load() != 1 || l.Open() != 2 {
		t.Fatalf("refused %d, open %d; want 1, 2", refused.Load(), l.Open())
	}
	got[0].Close()
	got[0].Close() // a second Close does not free a second slot
	if l.Open() != 1 {
		t.Fatalf("open after Close = %d, want 1", l.Open())
	}
	dial(t, inner.Addr().String())
	select {
	case <-accepted:
	case <-time.After(5 * time.Second):
		t.Fatal("a freed slot was not reused")
	}
}

// refusedConn dials addr and expects the connection closed unread: the
// reset may already fail the dial.
func refusedConn(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || isTimeout(err) {
		return fmt.Errorf("read = %v, want the connection closed", err)
	}
	return nil
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

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
	var refused atomic.Int32
	l := Wrap(inner, Config{Allow: func(net.Addr) bool { return false }, OnRefuse: func(net.Addr, string) { refused.Add(1) }})
	t.Cleanup(func() { l.Close() })
	go func() { _, _ = l.Accept() }()
	if err := refusedConn(inner.Addr().String()); err != nil {
		t.Fatalf("refused connection: %v", err)
	}
	if refused.Load() != 1 {
		t.Fatalf("refused = %d", refused.Load())
	}
}
