package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// rawPublisher is a minimal MQTT 3.1.1 QoS 1 publisher. The load generator
// shares two cores with the broker under test, so it must cost far less per
// message than a general-purpose client: one writer, one reader, no
// per-message goroutines.
type rawPublisher struct {
	conn   net.Conn
	w      *bufio.Writer
	wmu    sync.Mutex
	window chan uint16 // free packet ids; its capacity is the in-flight window
	sent   []time.Time // by packet id, guarded by wmu
	tags   []string    // by packet id, guarded by wmu
	onAck  func(tag string, latency time.Duration)
	done   chan error
}

func dialRaw(addr, clientID string, window int, onAck func(string, time.Duration)) (*rawPublisher, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	p := &rawPublisher{conn: conn, w: bufio.NewWriterSize(conn, 64<<10), window: make(chan uint16, window),
		sent: make([]time.Time, 65536), tags: make([]string, 65536), onAck: onAck, done: make(chan error, 1)}
	for i := 1; i <= window; i++ {
		p.window <- uint16(i)
	}
	// CONNECT, clean session, keepalive 60 s.
	vh := []byte{0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 60}
	body := append(vh, byte(len(clientID)>>8), byte(len(clientID)))
	body = append(body, clientID...)
	if _, err := conn.Write(append(fixedHeader(0x10, len(body)), body...)); err != nil {
		conn.Close()
		return nil, err
	}
	r := bufio.NewReader(conn)
	ack := make([]byte, 4)
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(r, ack); err != nil || ack[0] != 0x20 || ack[3] != 0 {
		conn.Close()
		return nil, fmt.Errorf("connack %x: %v", ack, err)
	}
	conn.SetReadDeadline(time.Time{})
	go p.readLoop(r)
	return p, nil
}

func fixedHeader(b byte, n int) []byte {
	h := []byte{b}
	for {
		d := byte(n % 128)
		n /= 128
		if n > 0 {
			d |= 0x80
		}
		h = append(h, d)
		if n == 0 {
			return h
		}
	}
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
	n := 2 + len(topic) + 2 + len(payload)
	p.wmu.Lock()
	defer p.wmu.Unlock()
	p.sent[pid] = time.Now()
	p.tags[pid] = tag
	p.w.Write(fixedHeader(0x32, n))
	p.w.Write([]byte{byte(len(topic) >> 8), byte(len(topic))})
	p.w.WriteString(topic)
	p.w.Write([]byte{byte(pid >> 8), byte(pid)})
	p.w.Write(payload)
	return p.w.Flush()
}

func (p *rawPublisher) readLoop(r *bufio.Reader) {
	hdr := make([]byte, 4)
	for {
		if _, err := io.ReadFull(r, hdr[:2]); err != nil {
			p.done <- err
			return
		}
		if hdr[0] != 0x40 || hdr[1] != 2 {
			p.done <- fmt.Errorf("unexpected packet %x", hdr[:2])
			return
		}
		if _, err := io.ReadFull(r, hdr[2:4]); err != nil {
			p.done <- err
			return
		}
		pid := binary.BigEndian.Uint16(hdr[2:4])
		p.wmu.Lock()
		t0, tag := p.sent[pid], p.tags[pid]
		p.wmu.Unlock()
		p.onAck(tag, time.Since(t0))
		p.window <- pid
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
	p.wmu.Lock()
	p.w.Write([]byte{0xE0, 0}) // DISCONNECT
	p.w.Flush()
	p.wmu.Unlock()
	p.conn.Close()
}
