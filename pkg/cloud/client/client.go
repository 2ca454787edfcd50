// Package client is the Go client of cloud-sync's edge-facing sync API
// (/sync/v1/): what an edge's syncer uses to push its outbox, pull cloud-side
// changes and heartbeat. It compresses bodies with zstd, fails over between
// the cluster's nodes (any node takes any request), and retries transport
// failures and 503s until the context ends — safe because pushes are
// idempotent by sequence number. Refusals the caller must act on come back as
// typed errors: *GapError (409), *ThrottledError (429), *APIError (other 4xx).
package client

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/outpost-edge/outpost/pkg/backoff"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// GapError: the push started beyond the next sequence the cloud expects.
// Rewind the outbox cursor to Expected and push again.
type GapError struct{ Expected uint64 }

func (e *GapError) Error() string { return fmt.Sprintf("cloud expects sequence %d next", e.Expected) }

// ThrottledError: the cloud is busy (429); wait RetryAfter and retry.
type ThrottledError struct{ RetryAfter time.Duration }

func (e *ThrottledError) Error() string {
	return fmt.Sprintf("cloud busy; retry after %s", e.RetryAfter)
}

// APIError is any other refusal, with the cloud's message.
type APIError struct {
	Status  int
	Message string
}

func (e *APIError) Error() string { return fmt.Sprintf("cloud answered %d: %s", e.Status, e.Message) }

// Client talks to a cloud-sync cluster. It is safe for concurrent use.
type Client struct {
	rounds    int // 0: retry until ctx ends
	urls      []string
	token     string
	hc        *http.Client
	enc       *zstd.Encoder
	preferred atomic.Int32
	compress  bool
	// defaultTransport is the transport New made (WithTLSConfig's target).
	defaultTransport *http.Transport
}

// Option configures a Client.
type Option func(*Client)

// WithTLSConfig sets the default HTTP client's TLS settings for https://
// URLs (e.g. a private CA's roots, certs.ClientConfig). Ignored with
// WithHTTPClient.
func WithTLSConfig(tc *tls.Config) Option {
	return func(c *Client) {
		if t, ok := c.hc.Transport.(*http.Transport); ok && t == c.defaultTransport {
			t.TLSClientConfig = tc
		}
	}
}

// WithHTTPClient replaces the default HTTP client.
func WithHTTPClient(hc *http.Client) Option { return func(c *Client) { c.hc = hc } }

// WithRounds bounds retries: after n full rounds over every URL without an
// answer, a call fails with ErrUnreachable, so the caller can run its own
// backoff and report the link as down. 0 (the default) retries until the
// context ends.
func WithRounds(n int) Option { return func(c *Client) { c.rounds = n } }

// ErrUnreachable: no cloud node answered within the configured rounds.
var ErrUnreachable = errors.New("client: no cloud node reachable")

// ErrUntrustedCertificate: a cloud node's TLS certificate did not verify
// (unknown CA, wrong name, expired). Retrying cannot fix that; the
// operator must (an edge's -cloud-ca). The call fails at once.
var ErrUntrustedCertificate = errors.New("client: the cloud's TLS certificate is not trusted")

// WithoutCompression sends bodies uncompressed.
func WithoutCompression() Option { return func(c *Client) { c.compress = false } }

// New returns a client for the cluster nodes at baseURLs (e.g.
// "http://10.0.0.1:8080"), authenticating with the edge's token.
func New(baseURLs []string, token string, opts ...Option) (*Client, error) {
	if len(baseURLs) == 0 {
		return nil, errors.New("client: no cloud URL")
	}
	for _, u := range baseURLs {
		if p, err := url.Parse(u); err != nil || p.Host == "" || (p.Scheme != "http" && p.Scheme != "https") {
			return nil, fmt.Errorf("client: %q is not an http(s) base URL", u)
		}
	}
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		return nil, fmt.Errorf("client: zstd: %w", err)
	}
	tr := &http.Transport{MaxIdleConnsPerHost: 128, IdleConnTimeout: 90 * time.Second, DisableCompression: true}
	c := &Client{
		urls: append([]string(nil), baseURLs...), token: token, enc: enc, compress: true,
		hc: &http.Client{Timeout: 30 * time.Second, Transport: tr}, defaultTransport: tr,
	}
	for i := range c.urls {
		c.urls[i] = strings.TrimRight(c.urls[i], "/")
	}
	for _, o := range opts {
		o(c)
	}
	return c, nil
}

// Close releases idle connections.
func (c *Client) Close() { c.hc.CloseIdleConnections() }

// Push sends one batch and returns the cloud's acknowledgement. Re-sending a
// batch (after a timeout, say) is safe: already-committed sequences are
// acknowledged without effect.
func (c *Client) Push(ctx context.Context, b *wire.PushBatch) (*wire.PushResult, error) {
	var res wire.PushResult
	return &res, c.do(ctx, http.MethodPost, wire.PathPush, b, &res)
}

// Pull fetches cloud-side changes after cursor ("" from the start).
func (c *Client) Pull(ctx context.Context, cursor string, limit int) (*wire.PullPage, error) {
	q := url.Values{}
	q.Set(wire.QueryCursor, cursor)
	if limit > 0 {
		q.Set(wire.QueryLimit, strconv.Itoa(limit))
	}
	var page wire.PullPage
	return &page, c.do(ctx, http.MethodGet, wire.PathPull+"?"+q.Encode(), nil, &page)
}

// PullSets fetches cloud-side changes after cursor as an edge that keeps
// versioned sets: have is the versions it holds, and the page carries only
// the sets that moved (the directory as a delta; see wire.PullPage). With
// wait > 0 the cloud may hold an empty pull that long (long-poll); the
// request's timeout is extended by wait.
func (c *Client) PullSets(ctx context.Context, cursor string, limit int, have wire.SetVersions, wait time.Duration) (*wire.PullPage, error) {
	q := url.Values{}
	q.Set(wire.QueryCursor, cursor)
	if limit > 0 {
		q.Set(wire.QueryLimit, strconv.Itoa(limit))
	}
	q.Set(wire.QueryHave, have.Encode())
	hc := c.hc
	if wait > 0 {
		q.Set(wire.QueryWait, strconv.FormatInt(wait.Milliseconds(), 10))
		if c.hc.Timeout > 0 {
			long := *c.hc
			long.Timeout += wait
			hc = &long
		}
	}
	var page wire.PullPage
	return &page, c.doWith(ctx, hc, http.MethodGet, wire.PathPull+"?"+q.Encode(), nil, &page)
}

// State sends state changes ahead of the sequenced stream (idempotent).
func (c *Client) State(ctx context.Context, b *wire.StateBatch) (*wire.StateResult, error) {
	var res wire.StateResult
	return &res, c.do(ctx, http.MethodPost, wire.PathState, b, &res)
}

// Alerts sends the latest value of alerts the edge raised or changed
// (idempotent: the cloud merges them).
func (c *Client) Alerts(ctx context.Context, b *wire.AlertBatch) (*wire.AlertResult, error) {
	var res wire.AlertResult
	return &res, c.do(ctx, http.MethodPost, wire.PathAlerts, b, &res)
}

// Call sends any request with this client's failover, retries and
// credentials (used for login and refresh forwarding, which authenticate
// with the edge token too).
func (c *Client) Call(ctx context.Context, method, path string, in, out any) error {
	return c.do(ctx, method, path, in, out)
}

// Heartbeat publishes the edge's directory entry and returns the cloud's
// committed sequence for the edge.
func (c *Client) Heartbeat(ctx context.Context, h *wire.Heartbeat) (*wire.HeartbeatResult, error) {
	var res wire.HeartbeatResult
	return &res, c.do(ctx, http.MethodPost, wire.PathHeartbeat, h, &res)
}

// do sends the request to the preferred node, moving on to the next node on
// a transport error or 503, with jittered backoff between full rounds, until
// ctx ends.
func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	return c.doWith(ctx, c.hc, method, path, in, out)
}

func (c *Client) doWith(ctx context.Context, hc *http.Client, method, path string, in, out any) error {
	var body []byte
	if in != nil {
		j, err := encode(in)
		if err != nil {
			return fmt.Errorf("client: encode: %w", err)
		}
		body = j
		if c.compress && len(j) >= minCompress {
			body = c.enc.EncodeAll(j, make([]byte, 0, len(j)/4))
		}
	}
	bo := backoff.Backoff{Base: 20 * time.Millisecond, Max: time.Second}
	var last error
	for attempt := 0; ; attempt++ {
		i := int(c.preferred.Load()) % len(c.urls)
		err := c.once(ctx, hc, method, c.urls[i]+path, body, out)
		var retry *retryable
		if !errors.As(err, &retry) {
			return err
		}
		last = retry.err
		c.preferred.CompareAndSwap(int32(i), int32((i+1)%len(c.urls)))
		if (attempt+1)%len(c.urls) != 0 {
			continue // try the next node straight away
		}
		if c.rounds > 0 && (attempt+1)/len(c.urls) >= c.rounds {
			return fmt.Errorf("%w: %v", ErrUnreachable, last)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("client: %w (last error: %v)", ctx.Err(), last)
		case <-time.After(bo.Next()):
		}
	}
}

// encode is a request body's JSON. A push, the bulk of what an edge sends,
// is written by wire.AppendPushBatch: its readings without reflection or a
// map per reading.
func encode(in any) ([]byte, error) {
	b, ok := in.(*wire.PushBatch)
	if !ok {
		return json.Marshal(in)
	}
	// About 70 bytes a reading of a ts, an id and two metrics: sized so
	// the buffer is not grown (and copied) once the push is written.
	size := 64
	for i := range b.Changes {
		size += 64 + 96*len(b.Changes[i].Readings)
	}
	return wire.AppendPushBatch(make([]byte, 0, size), b)
}

// follow makes the leader a follower named (wire.HeaderLeader) the
// preferred node, if it is one of the client's URLs.
func (c *Client) follow(leader string) {
	if leader == "" {
		return
	}
	leader = strings.TrimRight(leader, "/")
	for i, u := range c.urls {
		if u == leader {
			c.preferred.Store(int32(i))
			return
		}
	}
}

// minCompress is the body size below which compressing costs more CPU
// than the bytes it saves.
const minCompress = 1024

type retryable struct{ err error }

func (r *retryable) Error() string { return r.err.Error() }

func (c *Client) once(ctx context.Context, hc *http.Client, method, u string, body []byte, out any) error {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return fmt.Errorf("client: %w", err)
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
		if c.compress && len(body) > 0 && body[0] != '{' {
			req.Header.Set("Content-Encoding", wire.EncodingZstd)
		}
	}
	resp, err := hc.Do(req)
	if err == nil {
		c.follow(resp.Header.Get(wire.HeaderLeader))
	}
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("client: %w", ctx.Err())
		}
		var cv *tls.CertificateVerificationError
		if errors.As(err, &cv) {
			return fmt.Errorf("%w: %s: %v (trust its CA bundle with -cloud-ca / cloud.ca)", ErrUntrustedCertificate, u, cv.Err)
		}
		return &retryable{err: err}
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(io.LimitReader(resp.Body, 256<<20))
	if err != nil {
		return &retryable{err: err}
	}
	var env wire.Envelope[json.RawMessage]
	if err := json.Unmarshal(raw, &env); err != nil {
		if resp.StatusCode >= 500 {
			return &retryable{err: fmt.Errorf("status %d", resp.StatusCode)}
		}
		return fmt.Errorf("client: %s %s: undecodable response (status %d)", method, u, resp.StatusCode)
	}
	switch {
	case resp.StatusCode == http.StatusOK:
		if out != nil && len(env.Data) > 0 {
			if err := json.Unmarshal(env.Data, out); err != nil {
				return fmt.Errorf("client: decode response: %w", err)
			}
		}
		return nil
	case resp.StatusCode == http.StatusConflict && resp.Header.Get(wire.HeaderExpectedSeq) != "":
		exp, _ := strconv.ParseUint(resp.Header.Get(wire.HeaderExpectedSeq), 10, 64)
		return &GapError{Expected: exp}
	case resp.StatusCode == http.StatusTooManyRequests:
		secs, _ := strconv.Atoi(resp.Header.Get(wire.HeaderRetryAfter))
		return &ThrottledError{RetryAfter: time.Duration(max(secs, 1)) * time.Second}
	case resp.StatusCode >= 500:
		return &retryable{err: &APIError{Status: resp.StatusCode, Message: env.Message}}
	}
	return &APIError{Status: resp.StatusCode, Message: env.Message}
}
