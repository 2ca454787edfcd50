package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/valyala/fasthttp"

	"github.com/outpost-edge/outpost/pkg/cloud/client"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// rawPusher pushes over one kept-alive HTTP/1.1 connection with fasthttp's
// HostClient, which reuses its request, response and buffers. The load
// generator shares the two cores with the cluster it measures, and Go's
// net/http client (a reader and a writer goroutine per connection, header
// maps, the envelope decoded twice) cost about 70 µs of CPU per push here
// (see -loadgen client); this costs a fraction of that. The bytes on the
// wire are the protocol's: the same JSON body, zstd-compressed from 1 KiB
// like the edge client's, the same headers.
type rawPusher struct {
	hc   *fasthttp.HostClient
	req  fasthttp.Request
	resp fasthttp.Response
	body bytes.Buffer
	enc  *zstd.Encoder
}

func newRawPusher(addr, token string) (*rawPusher, error) {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		return nil, err
	}
	p := &rawPusher{enc: enc, hc: &fasthttp.HostClient{
		Addr:     addr,
		MaxConns: 1, // one pusher, one connection, as a wrk connection
		// Answers are bounded by a 30 s deadline, not ctx.
		ReadTimeout:              30 * time.Second,
		WriteTimeout:             30 * time.Second,
		NoDefaultUserAgentHeader: true,
		IsTLS:                    tlsOn,
		TLSConfig:                clientTLS,
	}}
	scheme := "http://"
	if tlsOn {
		scheme = "https://"
	}
	p.req.Header.SetMethod(fasthttp.MethodPost)
	p.req.SetRequestURI(scheme + addr + wire.PathPush)
	p.req.Header.Set("Authorization", "Bearer "+token)
	p.req.Header.SetContentType("application/json")
	return p, nil
}

func (p *rawPusher) Close() {
	p.hc.CloseIdleConnections()
	_ = p.enc.Close()
}

// errRetry: the node could not take the push now (503); try again.
var errRetry = errors.New("node answered 503")

// Push sends b and reads the answer. A 429 comes back as
// *client.ThrottledError, like the edge client's. POST is not idempotent,
// so HostClient does not resend it on a broken connection: a failed push
// returns its error and the next one dials again.
func (p *rawPusher) Push(_ context.Context, b *wire.PushBatch) error {
	p.body.Reset()
	if err := json.NewEncoder(&p.body).Encode(b); err != nil {
		return err
	}
	payload := p.body.Bytes()
	if len(payload) >= 1024 {
		payload = p.enc.EncodeAll(payload, make([]byte, 0, len(payload)/4))
		p.req.Header.Set(fasthttp.HeaderContentEncoding, wire.EncodingZstd)
	} else {
		p.req.Header.Del(fasthttp.HeaderContentEncoding)
	}
	p.req.SetBodyRaw(payload)
	if err := p.hc.Do(&p.req, &p.resp); err != nil {
		return err
	}
	switch status, body := p.resp.StatusCode(), p.resp.Body(); status {
	case fasthttp.StatusOK:
		if !bytes.HasPrefix(body, []byte(`{"code":0`)) {
			return fmt.Errorf("push answered 200 with %q", body)
		}
		return nil
	case fasthttp.StatusTooManyRequests:
		retryAfter, _ := strconv.Atoi(string(p.resp.Header.Peek(fasthttp.HeaderRetryAfter)))
		return &client.ThrottledError{RetryAfter: time.Duration(max(retryAfter, 1)) * time.Second}
	case fasthttp.StatusServiceUnavailable:
		return errRetry
	default:
		return fmt.Errorf("push answered %d: %s", status, body)
	}
}
