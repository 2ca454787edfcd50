package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/fasthttp/websocket"
	"github.com/mochi-mqtt/server/v2/packets"
)

// rawPhone is a minimal MQTT 3.1.1 client over WebSocket, as light as a
// phone's: one goroutine reading QoS 0 PUBLISHes. A full client (paho)
// costs the shared process several goroutines and buffers per session,
// which would bill the edge for the load generator's memory and CPU.
type rawPhone struct {
	ws *websocket.Conn
}

// dialPhone connects with password = token and subscribes to topic at
// QoS 0; onMsg gets each PUBLISH payload until the connection ends. A
// phone writes only CONNECT and SUBSCRIBE, so its write buffer comes from
// pool, shared by all phones, instead of being its own for its lifetime:
// the edge's memory per phone is measured with the phones in the process.
func dialPhone(url, token, id, topic string, pool websocket.BufferPool, onMsg func([]byte)) (*rawPhone, error) {
	d := websocket.Dialer{Subprotocols: []string{"mqtt"}, HandshakeTimeout: 30 * time.Second, ReadBufferSize: 1024, WriteBufferSize: 1024, WriteBufferPool: pool}
	ws, _, err := d.Dial(url, nil)
	if err != nil {
		return nil, fmt.Errorf("websocket: %w", err)
	}
	p := &rawPhone{ws: ws}
	r := bufio.NewReaderSize(&wsReader{ws: ws}, 1024)
	var buf bytes.Buffer
	con := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, ClientIdentifier: id,
			UsernameFlag: true, Username: []byte("bench"), PasswordFlag: true, Password: []byte(token)}}
	if err := con.ConnectEncode(&buf); err != nil {
		return nil, err
	}
	if err := ws.WriteMessage(websocket.BinaryMessage, buf.Bytes()); err != nil {
		return nil, err
	}
	if typ, body, err := readPacket(r); err != nil || typ != packets.Connack || len(body) < 2 || body[1] != 0 {
		ws.Close()
		return nil, fmt.Errorf("connack: type %d %x %v", typ, body, err)
	}
	buf.Reset()
	sub := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Subscribe, Qos: 1}, ProtocolVersion: 4, PacketID: 1,
		Filters: packets.Subscriptions{{Filter: topic, Qos: 0}}}
	if err := sub.SubscribeEncode(&buf); err != nil {
		return nil, err
	}
	if err := ws.WriteMessage(websocket.BinaryMessage, buf.Bytes()); err != nil {
		return nil, err
	}
	if typ, body, err := readPacket(r); err != nil || typ != packets.Suback || len(body) < 3 || body[2] != 0 {
		ws.Close()
		return nil, fmt.Errorf("suback: type %d %x %v", typ, body, err)
	}
	go func() {
		for {
			typ, body, err := readPacket(r)
			if err != nil {
				return
			}
			if typ == packets.Publish && len(body) >= 2 {
				if tl := int(body[0])<<8 | int(body[1]); len(body) >= 2+tl {
					onMsg(body[2+tl:]) // QoS 0: no packet id
				}
			}
		}
	}()
	return p, nil
}

func (p *rawPhone) Close() { _ = p.ws.Close() }

// readPacket reads one MQTT packet: its type and body.
func readPacket(r *bufio.Reader) (byte, []byte, error) {
	h, err := r.ReadByte()
	if err != nil {
		return 0, nil, err
	}
	n, mul := 0, 1
	for i := 0; ; i++ {
		b, err := r.ReadByte()
		if err != nil {
			return 0, nil, err
		}
		n += int(b&127) * mul
		mul *= 128
		if b < 128 {
			break
		}
		if i == 3 {
			return 0, nil, errors.New("malformed remaining length")
		}
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return 0, nil, err
	}
	return h >> 4, body, nil
}

// wsReader reads a WebSocket's binary messages as one stream.
type wsReader struct {
	ws *websocket.Conn
	r  io.Reader
}

func (w *wsReader) Read(p []byte) (int, error) {
	for {
		if w.r == nil {
			_, r, err := w.ws.NextReader()
			if err != nil {
				return 0, err
			}
			w.r = r
		}
		n, err := w.r.Read(p)
		if errors.Is(err, io.EOF) {
			w.r = nil
			if n == 0 {
				continue
			}
			err = nil
		}
		return n, err
	}
}
