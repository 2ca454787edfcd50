package broker

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/mochi-mqtt/server/v2/listeners"

	"github.com/outpost-edge/outpost/pkg/netlimit"
)

// errConnectTooLarge: the first packet announced more bytes than a client
// may send before it has authenticated.
var errConnectTooLarge = errors.New("mqtt: first packet exceeds the pre-authentication size limit")

// errNotConnect: the first packet is not a CONNECT (mochi refuses it too;
// the guard refuses it before mochi allocates its body).
var errNotConnect = errors.New("mqtt: first packet is not CONNECT")

// tcpListener is mochi's TCP listener rebuilt on netlimit: accept errors
// back off instead of ending the accept loop, connections are capped and,
// in loopback-only mode, refused by address, and every connection must send
// a CONNECT of bounded size within the connect timeout. It accepts nothing
// until gate is closed (the broker restores retained downlinks first).
type tcpListener struct {
	id             string
	ln             *netlimit.Listener
	gate           <-chan struct{}
	connectTimeout time.Duration
	maxConnect     int
	log            *slog.Logger
	closeOnce      sync.Once
	closeClients   func(listener string) // Broker.closeListenerClients
}

func (l *tcpListener) ID() string       { return l.id }
func (l *tcpListener) Address() string  { return l.ln.Addr().String() }
func (l *tcpListener) Protocol() string { return "tcp" }

// Init: the socket is bound in New's caller (Start), so a busy port fails
// before anything else is started.
func (l *tcpListener) Init(*slog.Logger) error { return nil }

func (l *tcpListener) Serve(establish listeners.EstablishFn) {
	<-l.gate
	for {
		c, err := l.ln.Accept()
		if err != nil {
			return // closed: netlimit retries every other error
		}
		// The deadline covers the whole CONNECT; mochi replaces it with
		// the keepalive once CONNECT is read.
		_ = c.SetDeadline(time.Now().Add(l.connectTimeout))
		go func() {
			if err := establish(l.id, &guardConn{Conn: c, max: l.maxConnect}); err != nil {
				l.log.Debug("mqtt connection ended", "remote", c.RemoteAddr().String(), "err", err)
			}
		}()
	}
}

// Close ignores mochi's CloseFn for the broker's own (closeClients).
func (l *tcpListener) Close(listeners.CloseFn) {
	l.closeOnce.Do(func() {
		_ = l.ln.Close()
		l.closeClients(l.id)
	})
}

// guardConn checks the fixed header of the first packet as it is read: it
// must be a CONNECT whose remaining length is at most max. mochi allocates
// the announced remaining length before reading it (clients.go ReadPacket),
// and its MaximumPacketSize is one limit for every packet; this is the
// smaller one for the packet read before authentication (finding 5).
type guardConn struct {
	net.Conn
	max int

	n      int // header bytes seen
	remain int
	mul    int
	done   bool
}

func (c *guardConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if !c.done && n > 0 {
		if gerr := c.scan(p[:n]); gerr != nil {
			_ = c.Conn.Close()
			return 0, gerr
		}
	}
	return n, err
}

// scan feeds bytes of the stream's start to the fixed-header parser.
func (c *guardConn) scan(b []byte) error {
	for _, x := range b {
		if c.n == 0 {
			if x>>4 != 1 { // packets.Connect
				return errNotConnect
			}
			c.n, c.mul = 1, 1
			continue
		}
		c.remain += int(x&0x7f) * c.mul
		c.mul *= 128
		c.n++
		if c.remain > c.max {
			return fmt.Errorf("%w: at least %d bytes, limit %d", errConnectTooLarge, c.remain, c.max)
		}
		if x&0x80 == 0 {
			c.done = true
			return nil
		}
		if c.n > 4 { // the remaining length is at most 4 bytes
			return fmt.Errorf("%w: malformed remaining length", errConnectTooLarge)
		}
	}
	return nil
}
