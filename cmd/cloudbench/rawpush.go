package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/outpost-edge/outpost/pkg/cloud/client"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// rawPusher pushes over one kept-alive HTTP/1.1 connection with a
// hand-rolled request writer and response reader, as wrk does. The load
// generator shares the two cores with the cluster it measures, and Go's
// net/http client (a reader and a writer goroutine per connection, header
// maps, the envelope decoded twice) cost about 70 µs of CPU per push here
// (see -loadgen client); this costs a fraction of that. The bytes on the
// wire are the protocol's: the same JSON body, zstd-compressed from 1 KiB
// like the edge client's, the same headers.
type rawPusher struct {
	addr, token string
	conn        net.Conn
	br          *bufio.Reader
	req, body   bytes.Buffer
	enc         *zstd.Encoder
	resp        []byte
}

func newRawPusher(addr, token string) (*rawPusher, error) {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		return nil, err
	}
	return &rawPusher{addr: addr, token: token, enc: enc}, nil
}

func (p *rawPusher) Close() {
	if p.conn != nil {
		_ = p.conn.Close()
	}
	_ = p.enc.Close()
}

// errRetry: the node could not take the push now (503); try again.
var errRetry = errors.New("node answered 503")

// Push sends b and reads the answer (bounded by a 30 s deadline, not ctx). A
// 429 comes back as *client.ThrottledError, like the edge client's.
func (p *rawPusher) Push(_ context.Context, b *wire.PushBatch) error {
	p.body.Reset()
	if err := json.NewEncoder(&p.body).Encode(b); err != nil {
		return err
	}
	payload, encoding := p.body.Bytes(), ""
	if len(payload) >= 1024 {
		payload, encoding = p.enc.EncodeAll(payload, make([]byte, 0, len(payload)/4)), wire.EncodingZstd
	}
	p.req.Reset()
	fmt.Fprintf(&p.req, "POST %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n",
		wire.PathPush, p.addr, p.token, len(payload))
	if encoding != "" {
		fmt.Fprintf(&p.req, "Content-Encoding: %s\r\n", encoding)
	}
	p.req.WriteString("\r\n")
	p.req.Write(payload)
	if p.conn == nil {
		c, err := net.DialTimeout("tcp", p.addr, 5*time.Second)
		if err != nil {
			return err
		}
		p.conn, p.br = c, bufio.NewReaderSize(c, 16<<10)
	}
	_ = p.conn.SetDeadline(time.Now().Add(30 * time.Second))
	status, retryAfter, err := p.roundTrip()
	if err != nil {
		_ = p.conn.Close()
		p.conn = nil
		return err
	}
	switch status {
	case 200:
		if !bytes.HasPrefix(p.resp, []byte(`{"code":0`)) {
			return fmt.Errorf("push answered 200 with %q", p.resp)
		}
		return nil
	case 429:
		return &client.ThrottledError{RetryAfter: time.Duration(max(retryAfter, 1)) * time.Second}
	case 503:
		return errRetry
	}
	return fmt.Errorf("push answered %d: %s", status, p.resp)
}

func (p *rawPusher) roundTrip() (status, retryAfter int, err error) {
	if _, err := p.conn.Write(p.req.Bytes()); err != nil {
		return 0, 0, err
	}
	line, err := p.br.ReadSlice('\n')
	if err != nil {
		return 0, 0, err
	}
	if len(line) < 12 || !bytes.HasPrefix(line, []byte("HTTP/1.1 ")) {
		return 0, 0, fmt.Errorf("bad status line %q", line)
	}
	if status, err = strconv.Atoi(string(line[9:12])); err != nil {
		return 0, 0, fmt.Errorf("bad status line %q", line)
	}
	length := -1
	for {
		h, err := p.br.ReadSlice('\n')
		if err != nil {
			return 0, 0, err
		}
		h = bytes.TrimRight(h, "\r\n")
		if len(h) == 0 {
			break
		}
		name, value, _ := bytes.Cut(h, []byte(":"))
		value = bytes.TrimSpace(value)
		switch {
		case bytes.EqualFold(name, []byte("Content-Length")):
			length, _ = strconv.Atoi(string(value))
		case bytes.EqualFold(name, []byte("Retry-After")):
			retryAfter, _ = strconv.Atoi(string(value))
		}
	}
	if length < 0 {
		return 0, 0, errors.New("response without Content-Length")
	}
	if cap(p.resp) < length {
		p.resp = make([]byte, length)
	}
	p.resp = p.resp[:length]
	if _, err := io.ReadFull(p.br, p.resp); err != nil {
		return 0, 0, err
	}
	return status, retryAfter, nil
}
