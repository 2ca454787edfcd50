package main

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
)

// rawDevice is a minimal MQTT 3.1.1 device: QoS 1 PUBLISHes, each written
// as it is made (one write each, as a device's client does), and a reader
// of their PUBACKs. paho, which the devices were before, costs the shared
// process five goroutines per device, a token and its completion channel
// per publish, and a wakeup of the publisher's goroutine per ack: in the
// edge's scheduler-latency profile its ack completions were the largest
// source of runnable goroutines, and the edge's own latencies (the
// phones' above all) were measured behind them.
type rawDevice struct {
	conn  net.Conn
	r     *bufio.Reader
	start time.Time     // the run's: ring times are µs since it
	room  chan struct{} // a slot per publish in flight
	n     int           // the last reading's number (the publishing goroutine's)

	wmu sync.Mutex // writes: publishes, and DISCONNECT at close
	buf bytes.Buffer
	id  uint16 // the last packet id used

	mu      sync.Mutex
	pending map[uint16]pend // publishes in flight by packet id
}

// pend is a publish in flight: its reading's ring entry and the run it
// counts in.
type pend struct {
	e  *ringEntry
	ph *phase
}

// phase is one run's acks.
type phase struct {
	acks  *hist
	acked atomic.Int64
}

// dialDevice connects as client id (clean session), reads the CONNACK
// and starts the device's reader of PUBACKs, which ends with the
// connection.
func dialDevice(addr, id string, inflight int, start time.Time) (*rawDevice, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	d := &rawDevice{conn: c, r: bufio.NewReaderSize(c, 4<<10), start: start, room: make(chan struct{}, inflight), pending: map[uint16]pend{}}
	con := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, ProtocolVersion: 4,
		Connect: packets.ConnectParams{ProtocolName: []byte("MQTT"), Clean: true, Keepalive: 60, ClientIdentifier: id}}
	if err := con.ConnectEncode(&d.buf); err != nil {
		c.Close()
		return nil, err
	}
	if _, err := c.Write(d.buf.Bytes()); err != nil {
		c.Close()
		return nil, err
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if typ, body, err := readPacket(d.r); err != nil || typ != packets.Connack || len(body) < 2 || body[1] != 0 {
		c.Close()
		return nil, fmt.Errorf("connack: type %d %x %v", typ, body, err)
	}
	_ = c.SetReadDeadline(time.Time{})
	go func() { _ = d.acks(d.acked) }()
	return d, nil
}

// acked notes the ack of publish id and frees its slot in the window.
func (d *rawDevice) acked(id uint16) {
	d.mu.Lock()
	p, ok := d.pending[id]
	delete(d.pending, id)
	d.mu.Unlock()
	if !ok {
		return
	}
	now := time.Since(d.start).Microseconds()
	p.e.acked.Store(now)
	p.ph.acks.add(time.Duration(now-p.e.sent.Load()) * time.Microsecond)
	p.ph.acked.Add(1)
	<-d.room
}

// publish writes one QoS 1 PUBLISH, in flight as p until its PUBACK. Ids
// cycle through 1..65535: a device keeps far fewer in flight.
func (d *rawDevice) publish(topic string, payload []byte, p pend) error {
	d.wmu.Lock()
	defer d.wmu.Unlock()
	if d.id++; d.id == 0 {
		d.id = 1
	}
	d.mu.Lock()
	d.pending[d.id] = p
	d.mu.Unlock()
	d.buf.Reset()
	pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1}, ProtocolVersion: 4,
		TopicName: topic, PacketID: d.id, Payload: payload}
	if err := pk.PublishEncode(&d.buf); err != nil {
		return err
	}
	_, err := d.conn.Write(d.buf.Bytes())
	return err
}

// acks reads PUBACKs until the connection ends, calling f with each one's
// packet id.
func (d *rawDevice) acks(f func(id uint16)) error {
	for {
		typ, body, err := readPacket(d.r)
		if err != nil {
			return err
		}
		if typ != packets.Puback || len(body) < 2 {
			return fmt.Errorf("device: unexpected packet type %d", typ)
		}
		f(uint16(body[0])<<8 | uint16(body[1]))
	}
}

// Close sends DISCONNECT and closes the connection.
func (d *rawDevice) Close() {
	d.wmu.Lock()
	_, _ = d.conn.Write([]byte{packets.Disconnect << 4, 0})
	d.wmu.Unlock()
	_ = d.conn.Close()
}
