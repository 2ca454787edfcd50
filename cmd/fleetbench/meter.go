package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/outpost-edge/outpost/pkg/wire"
)

// Operations of the sync API the meter tells apart.
const (
	opPull = iota
	opHeartbeat
	opPush
	opOther
	numOps
)

func opOf(path string) int {
	switch path {
	case wire.PathPull:
		return opPull
	case wire.PathHeartbeat:
		return opHeartbeat
	case wire.PathPush:
		return opPush
	}
	return opOther
}

// meter counts, for the whole fleet, what the cloud answered: responses,
// 200s and response body bytes per operation (as received: the edge's
// client asks for no transparent compression), 429s, 5xx and transport
// errors. Phases read it as deltas of snapshots.
type meter struct {
	responses [numOps]atomic.Int64
	ok        [numOps]atomic.Int64
	bytes     [numOps]atomic.Int64
	throttled atomic.Int64
	server5xx atomic.Int64
	transport atomic.Int64
	// failures counts exchanges a simulated edge's loop saw fail (after the
	// client's own retries), 429s excepted.
	failures atomic.Int64
	firstErr atomic.Pointer[string] // the first failure since resetFirst

	// refusals counts the answers other than 200 and a gap's 409 by
	// operation, status and the envelope's message ("push 503: …"), and
	// transport errors by operation: what the 429s and 5xx are.
	refMu    sync.Mutex
	refusals map[string]int64
}

type meterSnap struct {
	responses, ok, bytes                      [numOps]int64
	throttled, server5xx, transport, failures int64
	refusals                                  map[string]int64
}

var opNames = [numOps]string{"pull", "heartbeat", "push", "other"}

func (m *meter) refused(key string) {
	m.refMu.Lock()
	defer m.refMu.Unlock()
	if m.refusals == nil {
		m.refusals = map[string]int64{}
	}
	m.refusals[key]++
}

func (m *meter) snap() meterSnap {
	var s meterSnap
	for i := 0; i < numOps; i++ {
		s.responses[i], s.ok[i], s.bytes[i] = m.responses[i].Load(), m.ok[i].Load(), m.bytes[i].Load()
	}
	s.throttled, s.server5xx, s.transport, s.failures = m.throttled.Load(), m.server5xx.Load(), m.transport.Load(), m.failures.Load()
	m.refMu.Lock()
	s.refusals = make(map[string]int64, len(m.refusals))
	for k, v := range m.refusals {
		s.refusals[k] = v
	}
	m.refMu.Unlock()
	return s
}

func (s meterSnap) sub(o meterSnap) meterSnap {
	for i := 0; i < numOps; i++ {
		s.responses[i] -= o.responses[i]
		s.ok[i] -= o.ok[i]
		s.bytes[i] -= o.bytes[i]
	}
	s.throttled -= o.throttled
	s.server5xx -= o.server5xx
	s.transport -= o.transport
	s.failures -= o.failures
	d := map[string]int64{}
	for k, v := range s.refusals {
		if v -= o.refusals[k]; v > 0 {
			d[k] = v
		}
	}
	s.refusals = d
	return s
}

func (m *meter) fail(err error) {
	m.failures.Add(1)
	msg := err.Error()
	m.firstErr.CompareAndSwap(nil, &msg)
}

// first returns the first failure since the last call, and forgets it.
func (m *meter) first() string {
	if p := m.firstErr.Swap(nil); p != nil {
		return *p
	}
	return ""
}

// transport is one simulated edge's HTTP transport: its own connections, as
// a real edge has, with the settings of the edge's client (pkg/cloud/client),
// dialling loopback only, and counted by m.
func (m *meter) httpClient(edgeTimeout time.Duration) *http.Client {
	d := &net.Dialer{Timeout: 5 * time.Second}
	return &http.Client{Timeout: edgeTimeout, Transport: metered{m: m, rt: &http.Transport{
		MaxIdleConnsPerHost: 128, IdleConnTimeout: 90 * time.Second, DisableCompression: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			host, _, err := net.SplitHostPort(addr)
			if ip := net.ParseIP(host); err != nil || ip == nil || !ip.IsLoopback() {
				return nil, fmt.Errorf("fleetbench dials loopback only, not %q", addr)
			}
			return d.DialContext(ctx, network, addr)
		},
	}}}
}

type metered struct {
	m  *meter
	rt *http.Transport
}

func (t metered) RoundTrip(req *http.Request) (*http.Response, error) {
	op := opOf(req.URL.Path)
	resp, err := t.rt.RoundTrip(req)
	if err != nil {
		t.m.transport.Add(1)
		if req.Context().Err() == nil {
			t.m.refused(opNames[op] + " transport error")
		}
		return nil, err
	}
	t.m.responses[op].Add(1)
	switch {
	case resp.StatusCode == http.StatusOK:
		t.m.ok[op].Add(1)
	case resp.StatusCode == http.StatusTooManyRequests:
		t.m.throttled.Add(1)
	case resp.StatusCode >= 500:
		t.m.server5xx.Add(1)
	}
	resp.Body = &countingBody{ReadCloser: resp.Body, n: &t.m.bytes[op]}
	if resp.StatusCode != http.StatusOK && (resp.StatusCode != http.StatusConflict || resp.Header.Get(wire.HeaderExpectedSeq) == "") {
		// Refusals are small: read this one to count it by its message,
		// and hand the client the same bytes.
		raw, rerr := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		var env wire.Envelope[json.RawMessage]
		_ = json.Unmarshal(raw, &env)
		t.m.refused(fmt.Sprintf("%s %d: %s", opNames[op], resp.StatusCode, env.Message))
		resp.Body = io.NopCloser(io.MultiReader(bytes.NewReader(raw), errReader{rerr}))
	}
	return resp, nil
}

// errReader ends a replayed body with the error its read ended with (nil:
// io.EOF).
type errReader struct{ err error }

func (r errReader) Read([]byte) (int, error) {
	if r.err != nil {
		return 0, r.err
	}
	return 0, io.EOF
}

// CloseIdleConnections lets client.Close reach the wrapped transport.
func (t metered) CloseIdleConnections() { t.rt.CloseIdleConnections() }

type countingBody struct {
	io.ReadCloser
	n *atomic.Int64
}

func (b *countingBody) Read(p []byte) (int, error) {
	k, err := b.ReadCloser.Read(p)
	b.n.Add(int64(k))
	return k, err
}
