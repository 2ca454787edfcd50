// Package rawmqtt is a minimal MQTT 3.1.1 QoS 1 publisher over mochi's
// packet codec, for the load generators (cmd/edgebench, cmd/livebench).
// They share two cores with the broker under test, so a device must cost
// far less per message than a general-purpose client: one writer, one
// reader, no per-message goroutine, token or channel. paho costs five
// goroutines per device and a wakeup of the publisher per acknowledgement,
// and in one process with the edge those wakeups were the largest source
// of runnable goroutines the edge's own were scheduled behind.
//
// Each publish is written as it is made, one write each, as a device's
// client does: nothing is batched that a real device would not batch.
package rawmqtt

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"sync"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// mqtt311 is the protocol version byte of MQTT 3.1.1.
const mqtt311 = 4

// Options configure a Publisher. T is what a caller tags each publish
// with, handed back with its acknowledgement.
type Options[T any] struct {
	ClientID string
	// Window is how many publishes may be in flight (packet ids 1..Window).
	Window int
	// OnSend, if set, is called with a publish's tag once it has room in
	// the window, right before it is written.
	OnSend func(tag T)
	// OnAck is called with a publish's tag and the time from its write to
	// its PUBACK, from the publisher's reader goroutine, one at a time.
	OnAck func(tag T, latency time.Duration)
}

// Publisher is one connection publishing QoS 1 (clean session).
type Publisher[T any] struct {
	o      Options[T]
	conn   net.Conn
	wmu    sync.Mutex
	out    bytes.Buffer // the packet being written, guarded by wmu
	window chan uint16  // free packet ids; its capacity is the in-flight window
	sent   []time.Time  // by packet id, guarded by wmu
	tags   []T          // by packet id, guarded by wmu
	done   chan error   // the reader's end
}

// Dial connects to addr and waits up to 5 s for a successful CONNACK.
func Dial[T any](addr string, o Options[T]) (*Publisher[T], error) {
	if o.Window < 1 || o.Window > 65535 {
		return nil, fmt.Errorf("rawmqtt: window %d not in [1, 65535]", o.Window)
	}
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	p := &Publisher[T]{o: o, conn: conn, window: make(chan uint16, o.Window),
		sent: make([]time.Time, o.Window+1), tags: make([]T, o.Window+1), done: make(chan error, 1)}
	for i := 1; i <= o.Window; i++ {
		p.window <- uint16(i)
	}
	connect := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: mqtt311,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: o.ClientID}}
	if err := connect.ConnectEncode(&p.out); err != nil {
		conn.Close()
		return nil, err
	}
	if _, err := conn.Write(p.out.Bytes()); err != nil {
		conn.Close()
		return nil, err
	}
	r := bufio.NewReader(conn)
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	ack := packets.Packet{ProtocolVersion: mqtt311}
	body, err := ReadPacket(r, &ack, nil)
	if err == nil && ack.FixedHeader.Type != packets.Connack {
		err = fmt.Errorf("packet type %d", ack.FixedHeader.Type)
	}
	if err == nil {
		err = ack.ConnackDecode(body)
	}
	if err != nil || ack.ReasonCode != 0 {
		conn.Close()
		return nil, fmt.Errorf("connack (code %d): %v", ack.ReasonCode, err)
	}
	_ = conn.SetReadDeadline(time.Time{})
	go p.readLoop(r)
	return p, nil
}

// ReadPacket reads one packet's fixed header into pk and its body into buf
// (reused when large enough).
func ReadPacket(r *bufio.Reader, pk *packets.Packet, buf []byte) ([]byte, error) {
	hb, err := r.ReadByte()
	if err != nil {
		return nil, err
	}
	if err := pk.FixedHeader.Decode(hb); err != nil {
		return nil, err
	}
	n, _, err := packets.DecodeLength(r)
	if err != nil {
		return nil, err
	}
	pk.FixedHeader.Remaining = n
	buf = slices.Grow(buf[:0], n)[:n]
	_, err = io.ReadFull(r, buf)
	return buf, err
}

// Publish waits for a free slot in the window and sends one QoS 1 message;
// OnAck gets tag when it is acknowledged.
func (p *Publisher[T]) Publish(topic string, tag T, payload []byte) error {
	var pid uint16
	select {
	case pid = <-p.window:
	case err := <-p.done:
		p.done <- err
		return err
	}
	if p.o.OnSend != nil {
		p.o.OnSend(tag)
	}
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, ProtocolVersion: mqtt311,
		TopicName: topic, PacketID: pid, Payload: payload}
	p.wmu.Lock()
	defer p.wmu.Unlock()
	p.sent[pid] = time.Now()
	p.tags[pid] = tag
	p.out.Reset()
	if err := pk.PublishEncode(&p.out); err != nil {
		return err
	}
	_, err := p.conn.Write(p.out.Bytes())
	return err
}

func (p *Publisher[T]) readLoop(r *bufio.Reader) {
	var body []byte
	var zero T
	for {
		ack := packets.Packet{ProtocolVersion: mqtt311}
		var err error
		if body, err = ReadPacket(r, &ack, body); err != nil {
			p.done <- err
			return
		}
		if ack.FixedHeader.Type != packets.Puback {
			p.done <- fmt.Errorf("unexpected packet type %d", ack.FixedHeader.Type)
			return
		}
		if err := ack.PubackDecode(body); err != nil {
			p.done <- err
			return
		}
		if ack.PacketID == 0 || int(ack.PacketID) >= len(p.sent) {
			p.done <- fmt.Errorf("PUBACK of packet id %d, never sent", ack.PacketID)
			return
		}
		p.wmu.Lock()
		t0, tag := p.sent[ack.PacketID], p.tags[ack.PacketID]
		p.tags[ack.PacketID] = zero // drop the reference
		p.wmu.Unlock()
		p.o.OnAck(tag, time.Since(t0))
		p.window <- ack.PacketID
	}
}

// Drain waits until every in-flight publish is acknowledged.
func (p *Publisher[T]) Drain(timeout time.Duration) error {
	deadline := time.After(timeout)
	for i := 0; i < cap(p.window); i++ {
		select {
		case pid := <-p.window:
			defer func() { p.window <- pid }()
		case err := <-p.done:
			p.done <- err
			return err
		case <-deadline:
			return errors.New("timed out waiting for acknowledgements")
		}
	}
	return nil
}

// Close sends DISCONNECT and closes the connection.
func (p *Publisher[T]) Close() {
	disconnect := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}, ProtocolVersion: mqtt311}
	p.wmu.Lock()
	p.out.Reset()
	if disconnect.DisconnectEncode(&p.out) == nil {
		_, _ = p.conn.Write(p.out.Bytes())
	}
	p.wmu.Unlock()
	p.conn.Close()
}
