package api

import (
	"errors"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/fasthttp/websocket"
	"github.com/valyala/fasthttp"

	"github.com/outpost-edge/outpost/pkg/broker"
)

var _ broker.LiveConn = (*wsConn)(nil)

// wsPair is a real WebSocket over loopback: the server's end as /mqtt
// makes it (a wsConn) and a client's.
func wsPair(t *testing.T) (*wsConn, *websocket.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var pool sync.Pool
	conns := make(chan *wsConn, 1)
	done := make(chan struct{})
	srv := &fasthttp.Server{Handler: func(ctx *fasthttp.RequestCtx) {
		_ = upgrader(&pool).Upgrade(ctx, func(ws *websocket.Conn) {
			conns <- &wsConn{Conn: ws.NetConn(), ws: ws}
			<-done // the handler's return would close the connection
		})
	}}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { close(done); _ = srv.Shutdown() })
	d := websocket.Dialer{Subprotocols: []string{"mqtt"}, HandshakeTimeout: 5 * time.Second}
	cli, _, err := d.Dial("ws://"+ln.Addr().String()+"/mqtt", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	select {
	case c := <-conns:
		return c, cli
	case <-time.After(5 * time.Second):
		t.Fatal("no upgrade")
		return nil, nil
	}
}

// TestWSConnWriteLive: WriteLive writes one binary message; refuses,
// writing nothing, while another write holds the connection; keeps to
// the session's own write deadline when it is sooner than the timeout;
// and fails within about its timeout once the peer stops reading and the
// socket's buffers are full.
func TestWSConnWriteLive(t *testing.T) {
	c, cli := wsPair(t)
	_ = cli.SetReadDeadline(time.Now().Add(10 * time.Second))

	if ok, err := c.WriteLive([]byte("one"), time.Second); !ok || err != nil {
		t.Fatalf("WriteLive = %v, %v", ok, err)
	}
	if op, b, err := cli.ReadMessage(); err != nil || op != websocket.BinaryMessage || string(b) != "one" {
		t.Fatalf("client read %d %q %v, want binary \"one\"", op, b, err)
	}

	c.wmu.Lock() // another write under way
	ok, err := c.WriteLive([]byte("busy"), time.Second)
	c.wmu.Unlock()
	if ok || err != nil {
		t.Fatalf("WriteLive on a busy connection = %v, %v; want false, nil", ok, err)
	}
	if _, err := c.Write([]byte("two")); err != nil {
		t.Fatal(err)
	}
	if _, b, err := cli.ReadMessage(); err != nil || string(b) != "two" {
		t.Fatalf("client read %q %v, want \"two\" (nothing of the refused write)", b, err)
	}

	if err := c.SetWriteDeadline(time.Now().Add(-time.Second)); err != nil {
		t.Fatal(err)
	}
	if ok, err := c.WriteLive([]byte("late"), time.Hour); !ok || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("WriteLive past the session's write deadline = %v, %v; want a deadline error", ok, err)
	}
}

func TestWSConnWriteLiveFullSocket(t *testing.T) {
	c, _ := wsPair(t) // the client never reads
	msg := make([]byte, 256<<10)
	const timeout = 50 * time.Millisecond
	for i := range 400 { // 100 MiB: far past what loopback buffers hold
		start := time.Now()
		ok, err := c.WriteLive(msg, timeout)
		if took := time.Since(start); took > 2*time.Second {
			t.Fatalf("write %d took %s with a %s timeout", i, took, timeout)
		}
		if !ok {
			t.Fatalf("write %d: refused as busy", i)
		}
		if err != nil {
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("write %d: %v, want a deadline error", i, err)
			}
			return
		}
	}
	t.Fatal("a peer that reads nothing took 100 MiB")
}
