package main

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

// rawPublisher is a minimal MQTT 3.1.1 QoS 1 publisher over mochi's packet
// codec. The load generator shares two cores with the broker under test, so
// it must cost far less per message than a general-purpose client: one
// writer, one reader, no per-message goroutines.
type rawPublisher struct {
	conn   net.Conn
	wmu    sync.Mutex
	out    bytes.Buffer // the packet being written, guarded by wmu
	window chan uint16  // free packet ids; its capacity is the in-flight window
	sent   []time.Time  // by packet id, guarded by wmu
	tags   []string     // by packet id, guarded by wmu
	onAck  func(tag string, latency time.Duration)
	done   chan error
}

// mqtt311 is the protocol version byte of MQTT 3.1.1.
const mqtt311 = 4

func dialRaw(addr, clientID string, window int, onAck func(string, time.Duration)) (*rawPublisher, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	p := &rawPublisher{conn: conn, window: make(chan uint16, window),
		sent: make([]time.Time, 65536), tags: make([]string, 65536), onAck: onAck, done: make(chan error, 1)}
	for i := 1; i <= window; i++ {
		p.window <- uint16(i)
	}
	connect := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: mqtt311,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: clientID}}
	if err := connect.ConnectEncode(&p.out); err != nil {
		conn.Close()
		return nil, err
	}
	if _, err := conn.Write(p.out.Bytes()); err != nil {
		conn.Close()
		return nil, err
	}
	r := bufio.NewReader(conn)
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	ack := packets.Packet{ProtocolVersion: mqtt311}
	body, err := readPacket(r, &ack, nil)
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
	conn.SetReadDeadline(time.Time{})
	go p.readLoop(r)
	return p, nil
}

// readPacket reads one packet's fixed header into pk and its body into buf
// (reused when large enough).
func readPacket(r *bufio.Reader, pk *packets.Packet, buf []byte) ([]byte, error) {
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

// publish waits for a free slot in the window and sends one QoS 1 message;
// onAck gets tag when it is acknowledged.
func (p *rawPublisher) publish(topic, tag string, payload []byte) error {
	var pid uint16
	select {
	case pid = <-p.window:
	case err := <-p.done:
		p.done <- err
		return err
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

func (p *rawPublisher) readLoop(r *bufio.Reader) {
	var body []byte
	for {
		ack := packets.Packet{ProtocolVersion: mqtt311}
		var err error
		if body, err = readPacket(r, &ack, body); err != nil {
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
		p.wmu.Lock()
		t0, tag := p.sent[ack.PacketID], p.tags[ack.PacketID]
		p.wmu.Unlock()
		p.onAck(tag, time.Since(t0))
		p.window <- ack.PacketID
	}
}

// drain waits until every in-flight publish is acknowledged.
func (p *rawPublisher) drain(timeout time.Duration) error {
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

func (p *rawPublisher) close() {
	disconnect := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Disconnect}, ProtocolVersion: mqtt311}
	p.wmu.Lock()
	p.out.Reset()
	if disconnect.DisconnectEncode(&p.out) == nil {
		_, _ = p.conn.Write(p.out.Bytes())
	}
	p.wmu.Unlock()
	p.conn.Close()
}
