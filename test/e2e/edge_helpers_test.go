package e2e

// Helpers for the edge daemon's multi-process tests: build cmd/edge once per
// test binary, run it on free loopback ports with its own data directory,
// kill -9 and restart it, drive it with paho MQTT clients, and read back what
// it stored through the HTTP API. Every identifier here starts with "edge" so
// that it cannot clash with the cloud-sync helpers in this package.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// edgeBinary builds cmd/edge once per test binary.
func edgeBinary(t *testing.T) string {
	t.Helper()
	return goBinary(t, "./cmd/edge")
}

// edgeFreeAddr returns a loopback address that was free a moment ago. The
// port is released before the edge binds it, so a start can still lose a
// race for it; edgeProc.start retries with new ports when that happens.
func edgeFreeAddr(t *testing.T) string {
	t.Helper()
	return cloudFreePort(t)
}

// edgeLog collects the output of every incarnation of one edge.
type edgeLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *edgeLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *edgeLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// edgeProc is one edge daemon with a data directory that outlives its
// processes: start, kill -9, start again on the same data.
type edgeProc struct {
	t       *testing.T
	bin     string
	dataDir string
	args    []string // extra flags
	log     edgeLog
	starts  int

	HTTP, MQTT string // host:port of the current incarnation

	cmd    *exec.Cmd
	exited chan struct{}
}

// startEdge starts an edge on a fresh data directory and waits until it is
// ready. The process is killed when the test ends, and its output goes to
// the test log if the test failed.
func startEdge(t *testing.T, args ...string) *edgeProc {
	t.Helper()
	e := &edgeProc{t: t, bin: edgeBinary(t), dataDir: filepath.Join(t.TempDir(), "data"), args: args}
	t.Cleanup(func() {
		e.kill()
		if t.Failed() {
			t.Logf("edge output (%d starts, data %s):\n%s", e.starts, e.dataDir, edgeTail(e.log.String(), 300))
		}
	})
	e.start()
	return e
}

// start runs a new incarnation on the edge's data directory and waits for
// /readyz and the MQTT port.
func (e *edgeProc) start() {
	e.t.Helper()
	if e.running() {
		e.t.Fatal("edge: start while running")
	}
	for attempt := 1; ; attempt++ {
		err := e.startOnce()
		if err == nil {
			return
		}
		// Another process may have taken a port between edgeFreeAddr and
		// the edge's bind; anything else is a real failure.
		if attempt < 3 && strings.Contains(err.Error(), "address already in use") {
			e.t.Logf("edge start %d: %v; retrying on new ports", e.starts, err)
			continue
		}
		e.t.Fatalf("edge start %d: %v (its output follows at the end of the test)", e.starts, err)
	}
}

func (e *edgeProc) startOnce() error {
	e.HTTP, e.MQTT = edgeFreeAddr(e.t), edgeFreeAddr(e.t)
	e.starts++
	args := append([]string{
		"-id", "crash-e2e", "-data", e.dataDir, "-http", e.HTTP, "-mqtt-listen", e.MQTT,
		"-dev-login", "-admin", "admin", "-log-level", "info",
	}, e.args...)
	fmt.Fprintf(&e.log, "=== start %d: edge %s\n", e.starts, strings.Join(args, " "))
	cmd := exec.Command(e.bin, args...)
	cmd.Dir = filepath.Dir(e.dataDir) // nothing relative lands in the source tree
	cmd.Stdout, cmd.Stderr = &e.log, &e.log
	if err := cmd.Start(); err != nil {
		return err
	}
	exited, n := make(chan struct{}), e.starts
	go func() {
		err := cmd.Wait()
		fmt.Fprintf(&e.log, "=== start %d exited: %v\n", n, err)
		close(exited)
	}()
	e.cmd, e.exited = cmd, exited

	deadline := time.Now().Add(20 * time.Second)
	hc := &http.Client{Timeout: time.Second}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		if edgeReady(hc, e.HTTP, e.MQTT) {
			return nil
		}
		select {
		case <-exited:
			out := e.log.String()
			if i := strings.LastIndex(out, "=== start"); i >= 0 {
				out = out[i:]
			}
			if strings.Contains(out, "address already in use") {
				return errors.New("exited early: address already in use")
			}
			return errors.New("exited before it was ready")
		case <-tick.C:
		}
		if time.Now().After(deadline) {
			return errors.New("not ready after 20s")
		}
	}
}

func edgeReady(hc *http.Client, httpAddr, mqttAddr string) bool {
	resp, err := hc.Get("http://" + httpAddr + "/readyz")
	if err != nil {
		return false
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return false
	}
	c, err := net.DialTimeout("tcp", mqttAddr, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

func (e *edgeProc) running() bool {
	if e.cmd == nil {
		return false
	}
	select {
	case <-e.exited:
		return false
	default:
		return true
	}
}

// kill9 sends SIGKILL and waits until the process is gone.
func (e *edgeProc) kill9() {
	e.t.Helper()
	if !e.running() {
		e.t.Fatal("edge: kill -9 but it is not running (it died by itself: see its output)")
	}
	fmt.Fprintf(&e.log, "=== kill -9 start %d\n", e.starts)
	if err := e.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		e.t.Fatalf("kill -9 edge: %v", err)
	}
	select {
	case <-e.exited:
	case <-time.After(10 * time.Second):
		e.t.Fatal("edge still running 10s after SIGKILL")
	}
}

// kill is the cleanup path: SIGKILL whatever still runs, without failing.
func (e *edgeProc) kill() {
	if e.running() {
		_ = e.cmd.Process.Signal(syscall.SIGKILL)
		select {
		case <-e.exited:
		case <-time.After(10 * time.Second):
		}
	}
}

func edgeTail(s string, lines int) string {
	parts := strings.Split(s, "\n")
	if len(parts) <= lines {
		return s
	}
	return fmt.Sprintf("[... %d lines cut ...]\n%s", len(parts)-lines, strings.Join(parts[len(parts)-lines:], "\n"))
}

// --- HTTP API ---

type edgeEnvelope struct {
	Code    int             `json:"code"`
	Message string          `json:"message"`
	Data    json.RawMessage `json:"data"`
}

var edgeHTTP = &http.Client{Timeout: 15 * time.Second}

func (e *edgeProc) api(method, path, token string, body any, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://"+e.HTTP+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := edgeHTTP.Do(req)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("%s %s: read body: %w", method, path, err)
	}
	var env edgeEnvelope
	if err := json.Unmarshal(raw, &env); err != nil {
		return fmt.Errorf("%s %s: HTTP %d, body not an envelope: %v: %.200s", method, path, resp.StatusCode, err, raw)
	}
	if resp.StatusCode != http.StatusOK || env.Code != 0 {
		return fmt.Errorf("%s %s: HTTP %d code %d: %s", method, path, resp.StatusCode, env.Code, env.Message)
	}
	if out != nil {
		if err := json.Unmarshal(env.Data, out); err != nil {
			return fmt.Errorf("%s %s: decode data: %w", method, path, err)
		}
	}
	return nil
}

// login returns an admin access token (dev login, -admin admin).
func (e *edgeProc) login() string {
	e.t.Helper()
	var data struct {
		AccessToken string `json:"access_token"`
	}
	if err := e.api(http.MethodPost, "/api/v1/auth/login", "", map[string]string{"code": "dev:admin"}, &data); err != nil {
		e.t.Fatal(err)
	}
	if data.AccessToken == "" {
		e.t.Fatal("login: no access_token")
	}
	return data.AccessToken
}

// readingIDs reads every reading of device through the paginated API and
// counts each message id. A device the edge has never registered reads as
// empty.
func (e *edgeProc) readingIDs(token, device string) map[string]int {
	e.t.Helper()
	ids := map[string]int{}
	cursor := ""
	for page := 0; ; page++ {
		if page > 10000 {
			e.t.Fatalf("readings of %s: cursor does not end", device)
		}
		q := url.Values{"limit": {"1000"}}
		if cursor != "" {
			q.Set("cursor", cursor)
		}
		var data struct {
			Items []struct {
				TS int64  `json:"ts"`
				ID string `json:"id"`
			} `json:"items"`
			NextCursor string `json:"next_cursor"`
		}
		err := e.api(http.MethodGet, "/api/v1/devices/"+device+"/readings?"+q.Encode(), token, nil, &data)
		if err != nil && page == 0 && strings.Contains(err.Error(), "HTTP 404") {
			return ids
		}
		if err != nil {
			e.t.Fatal(err)
		}
		for _, it := range data.Items {
			ids[it.ID]++
		}
		if data.NextCursor == "" {
			return ids
		}
		cursor = data.NextCursor
	}
}

// readingCount is the store's own count of readings from GET /api/v1/edge.
func (e *edgeProc) readingCount(token string) int64 {
	e.t.Helper()
	var data struct {
		Readings int64 `json:"readings"`
	}
	if err := e.api(http.MethodGet, "/api/v1/edge", token, nil, &data); err != nil {
		e.t.Fatal(err)
	}
	return data.Readings
}

// --- MQTT load with a ledger of acknowledgements ---

// edgeDevice is one publishing device: message i has id "crash-{k}-{i}" and
// timestamp base+i, so ids and timestamps are unique per device. The ledger
// records which publishes were issued and which got their PUBACK.
type edgeDevice struct {
	k     int
	name  string
	base  int64 // ts of message 0, Unix ms
	acked []atomic.Bool
	sent  atomic.Int64 // messages [0, sent) were handed to the client
}

func newEdgeDevices(n, perDevice int) []*edgeDevice {
	base := time.Now().Add(-time.Hour).UnixMilli()
	devs := make([]*edgeDevice, n)
	for k := range devs {
		devs[k] = &edgeDevice{k: k, name: fmt.Sprintf("crash-%d", k), base: base, acked: make([]atomic.Bool, perDevice)}
	}
	return devs
}

func (d *edgeDevice) topic() string      { return "sensors/" + d.name + "/telemetry" }
func (d *edgeDevice) msgID(i int) string { return fmt.Sprintf("%s-%06d", d.name, i) }

func (d *edgeDevice) payload(i int) []byte {
	return fmt.Appendf(nil, `{"ts":%d,"id":%q,"metrics":{"seq":%d,"temp":%d.5}}`, d.base+int64(i), d.msgID(i), i, 15+i%20)
}

// edgeConnect connects a paho client for one device: QoS 1 publishes, clean
// session, no automatic reconnect or resend, in-memory client store. The
// test's ledger, not the client, decides what is resent.
func edgeConnect(t *testing.T, addr, clientID string) paho.Client {
	t.Helper()
	opts := paho.NewClientOptions().
		AddBroker("tcp://" + addr).
		SetClientID(clientID).
		SetCleanSession(true).
		SetAutoReconnect(false).
		SetConnectRetry(false).
		SetStore(paho.NewMemoryStore()).
		SetConnectTimeout(5 * time.Second).
		SetWriteTimeout(5 * time.Second). // bounds a Publish that races the connection's death
		SetKeepAlive(30 * time.Second)
	c := paho.NewClient(opts)
	tok := c.Connect()
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("mqtt connect %s to %s: %v", clientID, addr, tok.Error())
	}
	t.Cleanup(func() { c.Disconnect(0) })
	return c
}

// edgeAcks counts PUBACKs across devices and closes reached once the count
// hits at (if at > 0).
type edgeAcks struct {
	n       atomic.Int64
	at      int64
	once    sync.Once
	reached chan struct{}
}

func newEdgeAcks(at int64) *edgeAcks { return &edgeAcks{at: at, reached: make(chan struct{})} }

func (a *edgeAcks) add() {
	if n := a.n.Add(1); a.at > 0 && n >= a.at {
		a.once.Do(func() { close(a.reached) })
	}
}

// edgePublish publishes messages idx of d with up to window publishes in
// flight, recording each PUBACK in the ledger and in acks. It stops issuing
// new publishes at the first failure (the connection died) or when stop is
// closed, waits for those in flight, and returns the first error.
func edgePublish(c paho.Client, d *edgeDevice, idx []int, window int, acks *edgeAcks, stop <-chan struct{}) error {
	type flight struct {
		i   int
		tok paho.Token
	}
	var firstErr error
	q := make([]flight, 0, window)
	settle := func(f flight) {
		if !f.tok.WaitTimeout(20 * time.Second) {
			if firstErr == nil {
				firstErr = fmt.Errorf("%s: no PUBACK or error within 20s", d.msgID(f.i))
			}
			return
		}
		if err := f.tok.Error(); err != nil {
			if firstErr == nil {
				firstErr = fmt.Errorf("%s: %w", d.msgID(f.i), err)
			}
			return
		}
		d.acked[f.i].Store(true)
		acks.add()
	}
	for _, i := range idx {
		if firstErr != nil {
			break
		}
		select {
		case <-stop:
			firstErr = errors.New("stopped")
		default:
		}
		if firstErr != nil {
			break
		}
		if len(q) == window {
			settle(q[0])
			q = q[1:]
			if firstErr != nil {
				break
			}
		}
		if int64(i) >= d.sent.Load() {
			d.sent.Store(int64(i) + 1)
		}
		q = append(q, flight{i, c.Publish(d.topic(), 1, false, d.payload(i))})
	}
	for _, f := range q {
		settle(f)
	}
	return firstErr
}
