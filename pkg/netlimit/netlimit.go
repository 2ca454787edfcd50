// Package netlimit wraps a net.Listener so that a daemon survives what the
// network and the kernel throw at its accept loop: accept errors (EMFILE,
// ENFILE, ECONNABORTED, ENOBUFS) are counted and retried with a capped
// backoff instead of ending the loop, the number of open connections is
// capped, and connections may be refused by remote address before a byte
// is read. A full file-descriptor table then makes the daemon refuse
// connections (the kernel keeps them in the backlog or resets them), not
// exit.
//
// The standard library's http.Server backs off on temporary errors only,
// and mochi's TCP listener returns on the first error, which stopped the
// edge's broker for good (issue 11, finding 6).
package netlimit

import (
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Reasons a connection was refused, as passed to Config.OnRefuse.
const (
	RefusedCap    = "connection_cap" // MaxConns connections were already open
	RefusedRemote = "remote"         // Config.Allow refused the remote address
)

// Config configures a Listener. The zero value only retries accept errors.
type Config struct {
	// MaxConns caps the connections accepted and not yet closed; the
	// connection over the cap is closed at once. 0 means no cap.
	MaxConns int
	// Allow, when set, is asked about each connection's remote address; a
	// connection it refuses is closed before anything is read from it.
	Allow func(remote net.Addr) bool
	// OnAcceptError is called for every accept error the listener retries
	// (for a metric and a log line). It must not block.
	OnAcceptError func(err error)
	// OnRefuse is called for every connection closed unread, with
	// RefusedCap or RefusedRemote. It must not block.
	OnRefuse func(remote net.Addr, reason string)
	// MinBackoff and MaxBackoff bound the wait after consecutive accept
	// errors; it doubles from MinBackoff (default 5ms) up to MaxBackoff
	// (default 1s), as net/http does, and resets after a success.
	MinBackoff, MaxBackoff time.Duration
}

// Listener is a net.Listener with the behaviour Config describes. Its
// Accept returns an error only once the listener is closed.
type Listener struct {
	net.Listener
	cfg    Config
	open   atomic.Int64
	closed chan struct{}
	once   sync.Once
}

// Wrap returns ln with cfg's limits. Closing the Listener closes ln.
func Wrap(ln net.Listener, cfg Config) *Listener {
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 5 * time.Millisecond
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		cfg.MaxBackoff = max(time.Second, cfg.MinBackoff)
	}
	return &Listener{Listener: ln, cfg: cfg, closed: make(chan struct{})}
}

// Accept waits for and returns the next connection within the limits. It
// retries every accept error but the listener's own closing, which it
// returns (net.ErrClosed).
func (l *Listener) Accept() (net.Conn, error) {
	var wait time.Duration
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			select {
			case <-l.closed:
				return nil, net.ErrClosed
			default:
			}
			if errors.Is(err, net.ErrClosed) {
				return nil, err
			}
			if l.cfg.OnAcceptError != nil {
				l.cfg.OnAcceptError(err)
			}
			wait = min(max(2*wait, l.cfg.MinBackoff), l.cfg.MaxBackoff)
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-l.closed:
				t.Stop()
				return nil, net.ErrClosed
			}
			continue
		}
		wait = 0
		if l.cfg.Allow != nil && !l.cfg.Allow(c.RemoteAddr()) {
			l.refuse(c, RefusedRemote)
			continue
		}
		if n := l.open.Add(1); l.cfg.MaxConns > 0 && n > int64(l.cfg.MaxConns) {
			l.open.Add(-1)
			l.refuse(c, RefusedCap)
			continue
		}
		return &conn{Conn: c, l: l}, nil
	}
}

func (l *Listener) refuse(c net.Conn, reason string) {
	if l.cfg.OnRefuse != nil {
		l.cfg.OnRefuse(c.RemoteAddr(), reason)
	}
	// No lingering: the peer gets a reset at once and the descriptor is
	// free again.
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

// Close stops Accept and closes the wrapped listener; open connections
// stay open.
func (l *Listener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return l.Listener.Close()
}

// Open is the number of accepted connections not yet closed.
func (l *Listener) Open() int { return int(l.open.Load()) }

// conn gives its slot back on its first Close.
type conn struct {
	net.Conn
	l    *Listener
	once sync.Once
}

func (c *conn) Close() error {
	c.once.Do(func() { c.l.open.Add(-1) })
	return c.Conn.Close()
}

// Unwrap returns the accepted connection, e.g. for its *net.TCPConn.
func (c *conn) Unwrap() net.Conn { return c.Conn }

// IsLoopback reports whether addr is a loopback IP address (127.0.0.0/8,
// ::1); for use as Config.Allow when a service is open only locally.
func IsLoopback(addr net.Addr) bool {
	switch a := addr.(type) {
	case *net.TCPAddr:
		return a.IP.IsLoopback()
	case *net.UDPAddr:
		return a.IP.IsLoopback()
	case nil:
		return false
	}
	host, _, err := net.SplitHostPort(addr.String())
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
