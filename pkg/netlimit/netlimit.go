// Package netlimit wraps a net.Listener so that a daemon survives a full
// file-descriptor table and holds a bounded number of connections.
//
// A failed Accept (EMFILE, ENFILE, ECONNABORTED, …) is retried with a
// backoff from 5 ms doubling to 1 s, as net/http's Server does, instead of
// being returned to the server, which would stop serving; the first failure
// of a burst is logged and every failure is reported to Config.AcceptError.
// Only closing the listener ends Accept.
//
// Connections beyond Config.MaxConns in total, or Config.MaxConnsPerIP from
// one address, are accepted, answered by Config.Refuse and closed at once
// (gracefully, so that the answer is read), rather than left queued in the kernel as
// golang.org/x/net/netutil.LimitListener does: a client over the cap learns
// so immediately, and the connections being served are unaffected.
//
// Config.Allow refuses connections by remote address before a byte is read
// (the embedded broker's loopback-only mode uses IsLoopback). The edge's
// HTTP API, cloud-sync's and the embedded MQTT broker all listen through
// this package.
//
// Wrap the raw TCP listener; TLS, if any, goes outside (tls.NewListener
// over a netlimit.Listener), so that servers still see a *tls.Conn.
package netlimit

import (
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"
)

// Reasons a connection is refused, passed to Config.Refuse.
var (
	ErrTooManyConns      = errors.New("connection limit reached")
	ErrTooManyConnsPerIP = errors.New("connection limit for this address reached")
	ErrRefusedRemote     = errors.New("remote address not allowed")
)

// Config configures a Listener. The zero value retries accept errors and
// caps nothing.
type Config struct {
	// MaxConns caps the connections open at once; 0 is no cap.
	MaxConns int
	// MaxConnsPerIP caps the connections open at once from one remote
	// address; 0 is no cap.
	MaxConnsPerIP int
	// Allow, when set, is asked about each connection's remote address; a
	// connection it refuses (ErrRefusedRemote) is closed unread.
	Allow func(remote net.Addr) bool
	// Exempt reports addresses not held to MaxConnsPerIP (a trusted proxy
	// carries many clients' connections). They still count to MaxConns.
	Exempt func(netip.Addr) bool
	// Refuse is called with a connection over a cap or refused by Allow and
	// the reason (ErrTooManyConns, ErrTooManyConnsPerIP, ErrRefusedRemote), before the listener closes
	// it, so that the protocol can answer (a 503). It runs on the accept
	// path: it must not block (set a short write deadline).
	Refuse func(c net.Conn, reason error)
	// AcceptError is called with every failed Accept that is retried (for
	// a metric).
	AcceptError func(err error)
	// Name identifies the listener in log lines ("http").
	Name   string
	Logger *slog.Logger
}

// Backoff bounds between failed accepts, as net/http's Server.
const (
	minBackoff = 5 * time.Millisecond
	maxBackoff = time.Second
)

// Listener is a net.Listener with accept-error backoff and connection caps.
// Accept is called from one goroutine (the server's accept loop); Close and
// the connections' Close from any.
type Listener struct {
	net.Listener
	cfg Config
	log *slog.Logger

	closeOnce sync.Once
	closed    chan struct{}

	mu       sync.Mutex // guards open, perIP and refusing
	open     int
	perIP    map[netip.Addr]int
	refusing map[*net.TCPConn]struct{} // refused, lingering until the peer has read why
}

// New wraps ln.
func New(ln net.Listener, cfg Config) *Listener {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	if cfg.Name == "" {
		cfg.Name = ln.Addr().String()
	}
	return &Listener{Listener: ln, cfg: cfg, log: log, closed: make(chan struct{}),
		perIP: map[netip.Addr]int{}, refusing: map[*net.TCPConn]struct{}{}}
}

// Accept waits for the next connection within the caps. It returns an error
// only once the listener is closed.
func (l *Listener) Accept() (net.Conn, error) {
	var delay time.Duration
	failures := 0
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || l.isClosed() {
				return nil, err
			}
			failures++
			if l.cfg.AcceptError != nil {
				l.cfg.AcceptError(err)
			}
			if failures == 1 {
				// Once per burst: a full descriptor table fails every
				// accept until a connection closes.
				l.log.Warn("accept failed; retrying with backoff", "listener", l.cfg.Name, "err", err)
			}
			if delay = 2 * delay; delay == 0 {
				delay = minBackoff
			}
			delay = min(delay, maxBackoff)
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-l.closed:
				t.Stop()
				return nil, net.ErrClosed
			}
			continue
		}
		if failures > 0 {
			l.log.Info("accepting again", "listener", l.cfg.Name, "failed_accepts", failures)
			failures, delay = 0, 0
		}
		ip, reason := l.admit(c)
		if reason != nil {
			if l.cfg.Refuse != nil {
				l.cfg.Refuse(c, reason)
			}
			l.refuse(c, reason)
			continue
		}
		return &conn{Conn: c, l: l, ip: ip}, nil
	}
}

// Refused connections over a cap are closed gracefully so that the peer
// reads the answer Config.Refuse wrote: our side is shut for writing and
// what the peer sent is drained (up to refuseDrain bytes, for at most
// refuseLinger) before the close. Closing with the peer's request unread
// would reset the connection, and a reset may reach the client before it
// reads the answer, or even before its connect returns. At most
// maxRefusing are lingering at once; beyond that, and for a remote
// address Config.Allow refused, the connection is reset at once.
const (
	maxRefusing  = 32
	refuseLinger = 500 * time.Millisecond
	refuseDrain  = 64 << 10
)

func (l *Listener) refuse(c net.Conn, reason error) {
	tc, ok := c.(*net.TCPConn)
	if ok && !errors.Is(reason, ErrRefusedRemote) && l.startRefusing(tc) {
		go l.linger(tc)
		return
	}
	if ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

func (l *Listener) startRefusing(c *net.TCPConn) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.refusing) >= maxRefusing || l.isClosed() {
		return false
	}
	l.refusing[c] = struct{}{}
	return true
}

// linger closes a refused connection after its peer has read the answer,
// closed, or had refuseLinger. Listener.Close ends it early.
func (l *Listener) linger(c *net.TCPConn) {
	defer func() {
		l.mu.Lock()
		delete(l.refusing, c)
		l.mu.Unlock()
	}()
	_ = c.CloseWrite()
	_ = c.SetReadDeadline(time.Now().Add(refuseLinger))
	_, _ = io.Copy(io.Discard, io.LimitReader(c, refuseDrain))
	_ = c.SetLinger(0)
	_ = c.Close()
}

// Close closes the listener; a pending Accept returns net.ErrClosed.
// Accepted connections stay open.
func (l *Listener) Close() error {
	l.closeOnce.Do(func() { close(l.closed) })
	l.mu.Lock()
	for c := range l.refusing {
		_ = c.SetReadDeadline(time.Now()) // ends its linger
	}
	l.mu.Unlock()
	return l.Listener.Close()
}

// Open is the number of accepted connections not yet closed.
func (l *Listener) Open() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.open
}

func (l *Listener) isClosed() bool {
	select {
	case <-l.closed:
		return true
	default:
		return false
	}
}

// admit counts c in, or says which cap it is over. ip is c's remote
// address when it is held to the per-address cap, else invalid.
func (l *Listener) admit(c net.Conn) (netip.Addr, error) {
	if l.cfg.Allow != nil && !l.cfg.Allow(c.RemoteAddr()) {
		return netip.Addr{}, ErrRefusedRemote
	}
	var ip netip.Addr
	if l.cfg.MaxConnsPerIP > 0 {
		if ta, ok := c.RemoteAddr().(*net.TCPAddr); ok {
			ip = ta.AddrPort().Addr().Unmap()
			if l.cfg.Exempt != nil && l.cfg.Exempt(ip) {
				ip = netip.Addr{}
			}
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cfg.MaxConns > 0 && l.open >= l.cfg.MaxConns {
		return netip.Addr{}, ErrTooManyConns
	}
	if ip.IsValid() {
		if l.perIP[ip] >= l.cfg.MaxConnsPerIP {
			return netip.Addr{}, ErrTooManyConnsPerIP
		}
		l.perIP[ip]++
	}
	l.open++
	return ip, nil
}

func (l *Listener) release(ip netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.open--
	if ip.IsValid() {
		if n := l.perIP[ip] - 1; n > 0 {
			l.perIP[ip] = n
		} else {
			delete(l.perIP, ip)
		}
	}
}

// conn gives its slot back when closed (once, however often Close is
// called).
type conn struct {
	net.Conn
	l    *Listener
	ip   netip.Addr
	once sync.Once
}

func (c *conn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { c.l.release(c.ip) })
	return err
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
