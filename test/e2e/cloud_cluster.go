package e2e

// Helpers for cloud-sync's multi-process tests: build the binary once per
// test binary, start nodes on free loopback ports, kill and restart them,
// put TCP proxies between raft peers, and talk to the APIs.

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/benchproc"
	"github.com/outpost-edge/outpost/internal/devcerts"
	"github.com/outpost-edge/outpost/internal/tcpproxy"
	"github.com/outpost-edge/outpost/pkg/certs"
	"github.com/outpost-edge/outpost/pkg/cloud/client"
)

const (
	cloudAPIToken = "e2e-api-token-0123456789abcdef0123456789"
	cloudEdges    = 8 // edges e0..e7 get tokens
)

func cloudEdgeToken(edge string) string { return "tok-" + edge + "-secret-0123456789abcdef0123456789" }

// binaries holds the daemons built for this test binary, by package path.
var binaries struct {
	mu    sync.Mutex
	built map[string]*builtBinary
}

type builtBinary struct {
	once sync.Once
	path string
	err  error
}

// goBinary builds a main package of this module (e.g. "./cmd/edge") once per
// test binary. The binary is left in a temp dir because there is no
// test-binary-wide cleanup hook without a TestMain.
func goBinary(t *testing.T, pkg string) string {
	t.Helper()
	binaries.mu.Lock()
	if binaries.built == nil {
		binaries.built = map[string]*builtBinary{}
	}
	b := binaries.built[pkg]
	if b == nil {
		b = new(builtBinary)
		binaries.built[pkg] = b
	}
	binaries.mu.Unlock()
	b.once.Do(func() {
		dir, err := os.MkdirTemp("", "outpost-e2e-")
		if err != nil {
			b.err = err
			return
		}
		b.path = filepath.Join(dir, filepath.Base(pkg))
		_, file, _, _ := runtime.Caller(0)
		cmd := exec.Command("go", "build", "-o", b.path, pkg)
		cmd.Dir = filepath.Join(filepath.Dir(file), "..", "..")
		if out, err := cmd.CombinedOutput(); err != nil {
			b.err = fmt.Errorf("go build %s: %v\n%s", pkg, err, out)
		}
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.path
}

// buildCloudSync builds cmd/cloud-sync once per test binary.
func buildCloudSync(t *testing.T) string {
	t.Helper()
	return goBinary(t, "./cmd/cloud-sync")
}

func cloudFreePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// cloudNode is one cloud-sync process.
type cloudNode struct {
	ID       string
	Raft     string
	HTTP     string
	Data     string
	cmd      *exec.Cmd
	exited   chan struct{}
	logMu    sync.Mutex
	log      bytes.Buffer
	running  bool
	bootstr  bool
	joinURLs []string
	https    bool // the cluster runs with TLS (cloudWithTLS)
	noToken  bool // started without -api-token
}

func (n *cloudNode) URL() string {
	if n.https {
		return "https://" + n.HTTP
	}
	return "http://" + n.HTTP
}

func (n *cloudNode) Write(p []byte) (int, error) {
	n.logMu.Lock()
	defer n.logMu.Unlock()
	return n.log.Write(p)
}

func (n *cloudNode) Log() string {
	n.logMu.Lock()
	defer n.logMu.Unlock()
	return n.log.String()
}

type cloudCluster struct {
	t       *testing.T
	bin     string
	Nodes   []*cloudNode
	extra   []string
	proxies map[[2]int]*cloudProxy // [from,to] → proxy carrying from's raft traffic to to
	hc      *http.Client
	// certs, with cloudWithTLS, is the cluster's development PKI: every
	// node runs cluster mutual TLS and serves its HTTP port over https
	// with its certificate; clientTLS trusts the CA.
	certs      *devcerts.Set
	clientTLS  *tls.Config
	spareCerts []string
}

type cloudClusterOpt func(*cloudCluster)

// cloudWithArgs adds flags to every node.
func cloudWithArgs(a ...string) cloudClusterOpt {
	return func(c *cloudCluster) { c.extra = append(c.extra, a...) }
}

// cloudWithTLS runs the cluster with mutual TLS (-cluster-*) from a
// development CA made in the test's temp dir; the HTTP ports are https.
// spare names get certificates too, for nodes a test adds later.
func cloudWithTLS(spare ...string) cloudClusterOpt {
	return func(c *cloudCluster) { c.certs, c.spareCerts = &devcerts.Set{}, spare }
}

// cloudWithProxies routes every raft link i→j through its own TCP proxy, so a
// test can cut a node off from its peers in both directions.
func cloudWithProxies() cloudClusterOpt {
	return func(c *cloudCluster) { c.proxies = map[[2]int]*cloudProxy{} }
}

// startCloudCluster starts n nodes: the first bootstraps, the others join
// through it; it returns once every node sees all n members and a leader.
func startCloudCluster(t *testing.T, n int, opts ...cloudClusterOpt) *cloudCluster {
	t.Helper()
	c := &cloudCluster{t: t, bin: buildCloudSync(t), hc: &http.Client{Timeout: 10 * time.Second}}
	for _, o := range opts {
		o(c)
	}
	t.Cleanup(c.hc.CloseIdleConnections)
	base := t.TempDir()
	for i := 0; i < n; i++ {
		c.Nodes = append(c.Nodes, &cloudNode{
			ID: fmt.Sprintf("n%d", i), Raft: cloudFreePort(t), HTTP: cloudFreePort(t), Data: filepath.Join(base, fmt.Sprintf("n%d", i)),
			https: c.certs != nil,
		})
	}
	if c.certs != nil {
		var ids []string
		for _, nd := range c.Nodes {
			ids = append(ids, nd.ID)
		}
		set, err := devcerts.Write(filepath.Join(base, "certs"), devcerts.Options{Names: append(ids, c.spareCerts...)})
		if err != nil {
			t.Fatal(err)
		}
		pool, err := certs.LoadPool(set.CA)
		if err != nil {
			t.Fatal(err)
		}
		c.certs, c.clientTLS = set, &tls.Config{RootCAs: pool}
		c.hc.Transport = &http.Transport{TLSClientConfig: c.clientTLS}
	}
	if c.proxies != nil {
		for i := range c.Nodes {
			for j := range c.Nodes {
				if i != j {
					c.proxies[[2]int{i, j}] = startCloudProxy(t, c.Nodes[j].Raft)
				}
			}
		}
	}
	c.Nodes[0].bootstr = true
	c.start(0)
	c.waitLeader(c.Nodes[0], 10*time.Second)
	for i := 1; i < n; i++ {
		c.Nodes[i].joinURLs = []string{c.Nodes[0].URL()}
		c.start(i)
	}
	c.waitMembers(n, 20*time.Second)
	return c
}

// start starts node i. A fresh node whose free port was taken by someone
// else between probing and binding gets new ports and another try.
func (c *cloudCluster) start(i int) {
	c.t.Helper()
	n := c.Nodes[i]
	_, statErr := os.Stat(n.Data)
	fresh := os.IsNotExist(statErr)
	for attempt := 0; ; attempt++ {
		if c.startOnce(i) {
			return
		}
		if !fresh || attempt == 3 || !strings.Contains(n.Log(), "address already in use") {
			c.t.Fatalf("%s exited during start-up:\n%s", n.ID, cloudTail(n.Log(), 4000))
		}
		n.Raft, n.HTTP = cloudFreePort(c.t), cloudFreePort(c.t)
		for k, p := range c.proxies {
			if k[1] == i {
				p.SetTarget(n.Raft)
			}
		}
		_ = os.RemoveAll(n.Data)
	}
}

func (c *cloudCluster) startOnce(i int) bool {
	c.t.Helper()
	n := c.Nodes[i]
	n.logMu.Lock()
	n.log.Reset()
	n.logMu.Unlock()
	args := []string{"-id", n.ID, "-raft", n.Raft, "-http", n.HTTP, "-data", n.Data}
	if !n.noToken {
		args = append(args, "-api-token", cloudAPIToken)
	}
	if n.bootstr {
		args = append(args, "-bootstrap")
	}
	if len(n.joinURLs) > 0 {
		args = append(args, "-join", strings.Join(n.joinURLs, ","))
	}
	for e := 0; e < cloudEdges; e++ {
		edge := fmt.Sprintf("e%d", e)
		args = append(args, "-edge-token", edge+"="+cloudEdgeToken(edge))
	}
	if c.proxies != nil {
		for j := range c.Nodes {
			if j != i {
				args = append(args, "-raft-dial", c.Nodes[j].ID+"="+c.proxies[[2]int{i, j}].Addr())
			}
		}
	}
	if c.certs != nil {
		args = append(args, c.certs.ClusterArgs(n.ID)...)
	}
	args = append(args, c.extra...)
	cmd := exec.Command(c.bin, args...)
	cmd.Stdout, cmd.Stderr = n, n
	if err := cmd.Start(); err != nil {
		c.t.Fatalf("start %s: %v", n.ID, err)
	}
	n.cmd, n.exited, n.running = cmd, make(chan struct{}), true
	go func(done chan struct{}) { _ = cmd.Wait(); close(done) }(n.exited)
	c.t.Cleanup(func() {
		if n.cmd == cmd && n.running {
			_ = cmd.Process.Kill()
			<-n.exited
			n.running = false
		}
		if c.t.Failed() {
			c.t.Logf("--- log of %s ---\n%s", n.ID, cloudTail(n.Log(), 4000))
		}
	})
	return c.waitHTTP(n, 15*time.Second)
}

func cloudTail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// kill sends SIGKILL and waits for the process to die.
func (c *cloudCluster) kill(i int) {
	n := c.Nodes[i]
	_ = n.cmd.Process.Kill()
	<-n.exited
	n.running = false
}

// stop sends SIGTERM and waits for a clean exit.
func (c *cloudCluster) stop(i int) {
	c.t.Helper()
	n := c.Nodes[i]
	_ = n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-n.exited:
	case <-time.After(15 * time.Second):
		c.t.Fatalf("%s did not exit within 15s of SIGTERM", n.ID)
	}
	n.running = false
	if code := n.cmd.ProcessState.ExitCode(); code != 0 {
		c.t.Fatalf("%s exited with %d after SIGTERM", n.ID, code)
	}
}

// restart starts a stopped node on the same ports and data dir.
func (c *cloudCluster) restart(i int) {
	c.t.Helper()
	c.Nodes[i].bootstr, c.Nodes[i].joinURLs = false, nil
	c.start(i)
}

// waitHTTP waits for n's /healthz; false if the process exited first.
func (c *cloudCluster) waitHTTP(n *cloudNode, d time.Duration) bool {
	c.t.Helper()
	deadline := time.Now().Add(d)
	for {
		select {
		case <-n.exited:
			n.running = false
			return false
		default:
		}
		resp, err := c.hc.Get(n.URL() + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return true
			}
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s not serving HTTP after %s:\n%s", n.ID, d, cloudTail(n.Log(), 4000))
		}
		select {
		case <-n.exited:
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// cloudWaitFor polls cond until it holds or d passes.
func cloudWaitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		<-tick.C
	}
}

type cloudStatus struct {
	ID           string `json:"id"`
	Leader       string `json:"leader"`
	Term         uint64 `json:"term"`
	AppliedIndex uint64 `json:"applied_index"`
	State        string `json:"state"`
	Nodes        []struct {
		ID       string `json:"id"`
		RaftAddr string `json:"raft_addr"`
		HTTPAddr string `json:"http_addr"`
		Suffrage string `json:"suffrage"`
		State    string `json:"state"`
	} `json:"nodes"`
}

func (c *cloudCluster) status(n *cloudNode) (cloudStatus, error) {
	var st cloudStatus
	code, env, err := c.api(n, http.MethodGet, "/cluster/v1/status", nil)
	if err != nil {
		return st, err
	}
	if code != 200 {
		return st, fmt.Errorf("status %d: %s", code, env.Message)
	}
	return st, json.Unmarshal(env.Data, &st)
}

// leader returns the index of the node all running nodes agree leads.
func (c *cloudCluster) leader() (int, bool) {
	lead := ""
	for _, n := range c.Nodes {
		if !n.running {
			continue
		}
		st, err := c.status(n)
		if err != nil || st.Leader == "" || (lead != "" && st.Leader != lead) {
			return -1, false
		}
		lead = st.Leader
	}
	for i, n := range c.Nodes {
		if n.ID == lead && n.running {
			return i, true
		}
	}
	return -1, false
}

func (c *cloudCluster) waitLeader(n *cloudNode, d time.Duration) {
	c.t.Helper()
	cloudWaitFor(c.t, d, n.ID+" knows a leader", func() bool {
		st, err := c.status(n)
		return err == nil && st.Leader != ""
	})
}

func (c *cloudCluster) mustLeader(d time.Duration) int {
	c.t.Helper()
	idx := -1
	cloudWaitFor(c.t, d, "an agreed leader", func() bool {
		var ok bool
		idx, ok = c.leader()
		return ok
	})
	return idx
}

func (c *cloudCluster) waitMembers(n int, d time.Duration) {
	c.t.Helper()
	cloudWaitFor(c.t, d, fmt.Sprintf("%d members with addresses on every node", n), func() bool {
		for _, node := range c.Nodes {
			if !node.running {
				continue
			}
			st, err := c.status(node)
			if err != nil || st.Leader == "" || len(st.Nodes) != n {
				return false
			}
			for _, m := range st.Nodes {
				if m.HTTPAddr == "" {
					return false
				}
			}
		}
		return true
	})
}

func (c *cloudCluster) follower() int {
	l := c.mustLeader(10 * time.Second)
	for i, n := range c.Nodes {
		if i != l && n.running {
			return i
		}
	}
	c.t.Fatal("no running follower")
	return -1
}

type cloudEnvelope struct {
	Code    int             `json:"code"`
	Message string          `json:"message"`
	Data    json.RawMessage `json:"data"`
}

// api calls a node's HTTP API with the API token.
func (c *cloudCluster) api(n *cloudNode, method, path string, body any) (int, cloudEnvelope, error) {
	return c.apiTok(n, method, path, body, cloudAPIToken)
}

func (c *cloudCluster) apiTok(n *cloudNode, method, path string, body any, token string) (int, cloudEnvelope, error) {
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case []byte:
		rd = bytes.NewReader(b)
	case string:
		rd = strings.NewReader(b)
	default:
		j, _ := json.Marshal(b)
		rd = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, n.URL()+path, rd)
	if err != nil {
		return 0, cloudEnvelope{}, err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return 0, cloudEnvelope{}, err
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var env cloudEnvelope
	if err := json.Unmarshal(raw, &env); err != nil {
		return resp.StatusCode, env, fmt.Errorf("undecodable body %q: %w", cloudTail(string(raw), 200), err)
	}
	return resp.StatusCode, env, nil
}

// edgeClient is a sync client for edge over the given nodes (all running
// nodes when none are given).
func (c *cloudCluster) edgeClient(edge string, nodes ...*cloudNode) *client.Client {
	c.t.Helper()
	if len(nodes) == 0 {
		nodes = c.Nodes
	}
	var urls []string
	for _, n := range nodes {
		urls = append(urls, n.URL())
	}
	cl, err := client.New(urls, cloudEdgeToken(edge), client.WithTLSConfig(c.clientTLS))
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(cl.Close)
	return cl
}

// exportAll reads the whole export stream from n (leader-confirmed).
func (c *cloudCluster) exportAll(n *cloudNode) []cloudExportRecord {
	c.t.Helper()
	var out []cloudExportRecord
	cursor := ""
	for {
		req, _ := http.NewRequest(http.MethodGet, n.URL()+"/api/v1/export?consistency=strong&limit=10000&since="+cursor, nil)
		req.Header.Set("Authorization", "Bearer "+cloudAPIToken)
		resp, err := c.hc.Do(req)
		if err != nil {
			c.t.Fatalf("export: %v", err)
		}
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			c.t.Fatalf("export: %d %s", resp.StatusCode, raw)
		}
		n := 0
		dec := json.NewDecoder(bytes.NewReader(raw))
		for dec.More() {
			var r cloudExportRecord
			if err := dec.Decode(&r); err != nil {
				c.t.Fatalf("export line: %v", err)
			}
			out = append(out, r)
			n++
		}
		next := resp.Header.Get("X-Outpost-Next-Cursor")
		if n == 0 || next == cursor {
			return out
		}
		cursor = next
	}
}

type cloudExportRecord struct {
	Cursor   string `json:"cursor"`
	Index    uint64 `json:"index"`
	Edge     string `json:"edge"`
	Kind     string `json:"kind"`
	Device   string `json:"device"`
	Readings []struct {
		TS      int64              `json:"ts"`
		ID      string             `json:"id"`
		Metrics map[string]float64 `json:"metrics"`
	} `json:"readings"`
}

// labelled reads one labelled sample (full series name) from a node's
// /metrics.
func (c *cloudCluster) labelled(n *cloudNode, series string) (float64, bool) {
	m, err := benchproc.ScrapeAuth(c.hc, n.URL()+"/metrics", cloudAPIToken)
	if err != nil {
		return 0, false
	}
	return m.Value(series)
}

// metric reads one un-labelled sample from a node's /metrics.
func (c *cloudCluster) metric(n *cloudNode, name string) (float64, bool) {
	return c.labelled(n, name)
}

// cloudProxy forwards connections to a target and can cut them all.
type cloudProxy = tcpproxy.Proxy

func startCloudProxy(t *testing.T, target string) *cloudProxy {
	t.Helper()
	p, err := tcpproxy.Listen(target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

// isolate cuts (or heals) every raft link to and from node i.
func (c *cloudCluster) isolate(i int, cut bool) {
	for k, p := range c.proxies {
		if k[0] == i || k[1] == i {
			p.Cut(cut)
		}
	}
}

func cloudCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
