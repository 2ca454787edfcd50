package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/valyala/fasthttp"

	"github.com/outpost-edge/outpost/pkg/cloud/client"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// fakeCloud serves the push endpoint on loopback with handler.
func fakeCloud(t testing.TB, handler fasthttp.RequestHandler) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &fasthttp.Server{Handler: handler}
	go func() { _ = srv.Serve(ln) }()
	t.Cleanup(func() { _ = srv.Shutdown() })
	return ln.Addr().String()
}

func batch(readings int) *wire.PushBatch {
	rs := make([]wire.Reading, readings)
	for i := range rs {
		rs[i] = wire.Reading{TS: int64(1732170000000 + i), ID: fmt.Sprintf("r%d", i), Metrics: map[string]float64{"temp": 21.5, "hum": 40}}
	}
	return &wire.PushBatch{Edge: "e1", FirstSeq: 1, Changes: []wire.Change{{Kind: wire.KindReadings, Device: "d1", Readings: rs}}}
}

// The pusher sends the protocol's request (path, token, JSON, zstd from
// 1 KiB) and maps the answers as the edge client does.
func TestRawPusher(t *testing.T) {
	dec, err := zstd.NewReader(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	var status int
	var answer string
	addr := fakeCloud(t, func(c *fasthttp.RequestCtx) {
		body := c.Request.Body()
		if string(c.Request.Header.Peek("Content-Encoding")) == wire.EncodingZstd {
			if body, err = dec.DecodeAll(body, nil); err != nil {
				t.Errorf("zstd body: %v", err)
			}
		} else if len(body) >= 1024 {
			t.Errorf("%d-byte body sent uncompressed", len(body))
		}
		switch {
		case string(c.Path()) != wire.PathPush || !c.IsPost():
			t.Errorf("request %s %s", c.Method(), c.Path())
		case string(c.Request.Header.Peek("Authorization")) != "Bearer tok":
			t.Errorf("Authorization %q", c.Request.Header.Peek("Authorization"))
		case string(c.Request.Header.ContentType()) != "application/json":
			t.Errorf("Content-Type %q", c.Request.Header.ContentType())
		case !strings.HasPrefix(string(body), `{"edge":"e1","first_seq":1,`):
			t.Errorf("body %.80q", body)
		}
		if status == 429 {
			c.Response.Header.Set("Retry-After", "3")
		}
		c.SetStatusCode(status)
		c.SetBodyString(answer)
	})
	p, err := newRawPusher(addr, "tok")
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	tests := []struct {
		name     string
		status   int
		answer   string
		readings int
		check    func(error) bool
	}{
		{"ok", 200, `{"code":0,"data":{"acked_seq":1}}`, 1, func(err error) bool { return err == nil }},
		{"ok compressed", 200, `{"code":0,"data":{"acked_seq":100}}`, 100, func(err error) bool { return err == nil }},
		{"200 with an error code", 200, `{"code":3}`, 1, func(err error) bool { return err != nil }},
		{"throttled", 429, `{"code":7}`, 1, func(err error) bool {
			var th *client.ThrottledError
			return errors.As(err, &th) && th.RetryAfter == 3*time.Second
		}},
		{"unavailable", 503, `{"code":8}`, 1, func(err error) bool { return errors.Is(err, errRetry) }},
		{"refused", 409, `{"code":9}`, 1, func(err error) bool { return err != nil && strings.Contains(err.Error(), "409") }},
	}
	for _, tt := range tests {
		status, answer = tt.status, tt.answer
		if err := p.Push(context.Background(), batch(tt.readings)); !tt.check(err) {
			t.Errorf("%s: Push = %v", tt.name, err)
		}
	}
}

// BenchmarkRawPush is the load generator's cost of one batch-of-1 push,
// the fake server's included (the same for any pusher).
func BenchmarkRawPush(b *testing.B) {
	addr := fakeCloud(b, func(c *fasthttp.RequestCtx) { c.SetBodyString(`{"code":0,"data":{"acked_seq":1}}`) })
	p, err := newRawPusher(addr, "tok")
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	pb := batch(1)
	b.ReportAllocs()
	for b.Loop() {
		if err := p.Push(context.Background(), pb); err != nil {
			b.Fatal(err)
		}
	}
}
