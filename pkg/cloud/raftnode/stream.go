package raftnode

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// handshakeTimeout bounds a peer's TLS handshake on the raft port, so a
// connection that never completes one holds nothing for long.
const handshakeTimeout = 10 * time.Second

// tlsStream is raft's StreamLayer over mutual TLS (the model is rqlite's
// TLS layer). Inbound connections handshake on their first read, in the
// transport's per-connection goroutine, so a slow or silent peer never
// stalls Accept; a peer without a certificate from the cluster CA fails
// that handshake, and raft reads no byte of what it sent.
type tlsStream struct {
	ln        net.Listener
	advertise net.Addr
	server    *tls.Config
	client    *tls.Config
}

func newTLSStream(bind string, advertise net.Addr, server, client *tls.Config) (*tlsStream, error) {
	ln, err := net.Listen("tcp", bind)
	if err != nil {
		return nil, err
	}
	return &tlsStream{ln: ln, advertise: advertise, server: server, client: client}, nil
}

// Accept implements net.Listener.
func (s *tlsStream) Accept() (net.Conn, error) {
	c, err := s.ln.Accept()
	if err != nil {
		return nil, err
	}
	return &handshakeFirst{Conn: tls.Server(c, s.server)}, nil
}

// Close implements net.Listener.
func (s *tlsStream) Close() error { return s.ln.Close() }

// Addr implements net.Listener: the advertised address, as raft's TCP
// layer does.
func (s *tlsStream) Addr() net.Addr {
	if s.advertise != nil {
		return s.advertise
	}
	return s.ln.Addr()
}

// Dial implements raft.StreamLayer: the handshake completes, verifying the
// peer's certificate, before the connection is returned.
func (s *tlsStream) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	d := tls.Dialer{Config: s.client}
	c, err := d.DialContext(ctx, "tcp", string(addr))
	if err != nil {
		return nil, fmt.Errorf("raft tls dial %s: %w", addr, err)
	}
	return c, nil
}

// handshakeFirst completes the server handshake, under a deadline, before
// the first read or write reaches the connection.
type handshakeFirst struct {
	*tls.Conn
	once sync.Once
	err  error
}

func (h *handshakeFirst) handshake() error {
	h.once.Do(func() {
		_ = h.Conn.SetDeadline(time.Now().Add(handshakeTimeout))
		if h.err = h.Conn.Handshake(); h.err == nil {
			h.err = h.Conn.SetDeadline(time.Time{})
		}
	})
	return h.err
}

func (h *handshakeFirst) Read(p []byte) (int, error) {
	if err := h.handshake(); err != nil {
		return 0, err
	}
	return h.Conn.Read(p)
}

func (h *handshakeFirst) Write(p []byte) (int, error) {
	if err := h.handshake(); err != nil {
		return 0, err
	}
	return h.Conn.Write(p)
}
