package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/outpost-edge/outpost/internal/benchproc"
)

const apiToken = "fleetbench-api-token-0123456789abcdef"

// edgeToken is edge's sync credential: one per edge, as in a deployment.
func edgeToken(edge string) string { return "fleetbench-sync-token-0123456789abcdef-" + edge }

// node is one cloud-sync process.
type node struct {
	id, raft, http, data string
	admin                string // pprof address; "" unless the run profiles
	cmd                  *exec.Cmd
	done                 chan struct{} // closed when the process has exited
}

func (n *node) url() string { return "http://" + n.http }

func (n *node) alive() bool {
	select {
	case <-n.done:
		return false
	default:
		return true
	}
}

// cluster is the cloud-sync processes under test, on loopback.
type cluster struct {
	bin   string
	args  []string // extra flags for every node
	pprof bool     // give every node its own -pprof address
	log   io.Writer
	nodes []*node
	hc    *http.Client
}

// writeTokens writes the edges' credentials as a config file with only the
// edge_tokens map: 1,000 -edge-token flags would fit in argv (about 60 KB
// of the kernel's 2 MB), but a file scales to any fleet and keeps the
// tokens out of ps.
func writeTokens(path string, edges []string) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	w := bufio.NewWriter(f)
	fmt.Fprintln(w, "# written by fleetbench: one credential per simulated edge")
	fmt.Fprintln(w, "edge_tokens:")
	for _, e := range edges {
		// Double-quoted YAML scalars are JSON strings.
		fmt.Fprintf(w, "  %s: %s\n", strconv.Quote(e), strconv.Quote(edgeToken(e)))
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// start runs n nodes: the first bootstraps, the others join it, and start
// returns once every node reports a leader and all n members.
func (c *cluster) start(ctx context.Context, dir string, n int, edges []string) error {
	tokens := filepath.Join(dir, "edge-tokens.yaml")
	if err := writeTokens(tokens, edges); err != nil {
		return fmt.Errorf("edge tokens: %w", err)
	}
	for i := 0; i < n; i++ {
		nd := &node{id: fmt.Sprintf("f%d", i), raft: benchproc.FreeAddr(), http: benchproc.FreeAddr(),
			data: filepath.Join(dir, fmt.Sprintf("node%d", i))}
		c.nodes = append(c.nodes, nd)
		args := []string{"-config", tokens, "-id", nd.id, "-raft", nd.raft, "-http", nd.http, "-data", nd.data,
			"-api-token", apiToken, "-log-level", "warn"}
		if c.pprof {
			nd.admin = benchproc.FreeAddr()
			args = append(args, "-pprof", nd.admin)
		}
		if i == 0 {
			args = append(args, "-bootstrap")
		} else {
			args = append(args, "-join", c.nodes[0].url())
		}
		nd.cmd = exec.Command(c.bin, append(args, c.args...)...)
		nd.cmd.Stdout, nd.cmd.Stderr = c.log, c.log
		// The nodes die with this process even if it is killed outright.
		nd.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := nd.cmd.Start(); err != nil {
			return fmt.Errorf("start %s: %w", c.bin, err)
		}
		nd.done = make(chan struct{})
		go func() { _ = nd.cmd.Wait(); close(nd.done) }()
		if i == 0 {
			if err := c.waitMembers(ctx, 1, 20*time.Second); err != nil {
				return err
			}
		}
	}
	return c.waitMembers(ctx, n, 30*time.Second)
}

// profile starts a CPU profile of d on every node that has a pprof
// address, each written to dir/<id>.pprof; the returned func waits for
// them (a profile that fails is logged and skipped: it must not fail the
// run).
func (c *cluster) profile(ctx context.Context, dir string, d time.Duration, logf func(string, ...any)) func() {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		logf("profile: %v", err)
		return func() {}
	}
	secs := int(d.Seconds())
	done := make(chan struct{})
	left := 0
	for _, n := range c.nodes {
		if n.admin == "" {
			continue
		}
		left++
		go func() {
			defer func() { done <- struct{}{} }()
			if err := profileTo(ctx, n, secs, filepath.Join(dir, n.id+".pprof")); err != nil {
				logf("profile %s: %v", n.id, err)
			}
		}()
	}
	return func() {
		for ; left > 0; left-- {
			<-done
		}
	}
}

func profileTo(ctx context.Context, n *node, secs int, path string) error {
	ctx, cancel := context.WithTimeout(ctx, time.Duration(secs+30)*time.Second)
	defer cancel()
	url := fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", n.admin, secs)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// stop kills every node and waits (bounded) for each to exit.
func (c *cluster) stop() {
	for _, n := range c.nodes {
		if n.cmd == nil || n.cmd.Process == nil {
			continue
		}
		_ = n.cmd.Process.Kill()
		select {
		case <-n.done:
		case <-time.After(5 * time.Second):
		}
	}
}

type status struct {
	Leader string `json:"leader"`
	Nodes  []struct {
		ID string `json:"id"`
	} `json:"nodes"`
}

func (c *cluster) get(ctx context.Context, url string) (*http.Response, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		cancel()
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+apiToken)
	resp, err := c.hc.Do(req)
	if err != nil {
		cancel()
		return nil, err
	}
	resp.Body = cancelBody{resp.Body, cancel}
	return resp, nil
}

type cancelBody struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (b cancelBody) Close() error { err := b.ReadCloser.Close(); b.cancel(); return err }

func (c *cluster) status(ctx context.Context, n *node) (status, error) {
	var env struct {
		Data status `json:"data"`
	}
	resp, err := c.get(ctx, n.url()+"/cluster/v1/status")
	if err != nil {
		return env.Data, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return env.Data, fmt.Errorf("%s: status %s", n.id, resp.Status)
	}
	return env.Data, json.NewDecoder(resp.Body).Decode(&env)
}

// waitMembers polls until every started node sees a leader and members
// members, for at most d.
func (c *cluster) waitMembers(ctx context.Context, members int, d time.Duration) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		ready := true
		for _, n := range c.nodes {
			if !n.alive() {
				return fmt.Errorf("node %s exited while the cluster formed", n.id)
			}
			st, err := c.status(ctx, n)
			if err != nil || st.Leader == "" || len(st.Nodes) != members {
				ready = false
				break
			}
		}
		if ready {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("cluster of %d did not form within %s", members, d)
}

// leader is the node the live nodes name as leader.
func (c *cluster) leader(ctx context.Context) (*node, error) {
	for _, n := range c.nodes {
		if !n.alive() {
			continue
		}
		st, err := c.status(ctx, n)
		if err != nil || st.Leader == "" {
			continue
		}
		for _, m := range c.nodes {
			if m.id == st.Leader && m.alive() {
				return m, nil
			}
		}
	}
	return nil, errors.New("no leader")
}

// cpu is the CPU seconds the live nodes have used.
func (c *cluster) cpu() float64 {
	total := 0.0
	for _, n := range c.nodes {
		if s, err := benchproc.CPUSeconds(n.cmd.Process.Pid); err == nil {
			total += s
		}
	}
	return total
}

// pids are the live nodes' process ids.
func (c *cluster) pids() []int {
	var ps []int
	for _, n := range c.nodes {
		if n.alive() {
			ps = append(ps, n.cmd.Process.Pid)
		}
	}
	return ps
}

func (c *cluster) aliveCount() int {
	k := 0
	for _, n := range c.nodes {
		if n.alive() {
			k++
		}
	}
	return k
}

// raftSample is what a node's /metrics says of raft.
type raftSample struct {
	applied  float64 // last raft index applied to the state
	commands float64 // commands group-committed into entries so far
	term     float64 // one more per election
}

func (c *cluster) raftStats(n *node) (raftSample, error) {
	m, err := benchproc.ScrapeAuth(c.hc, n.url()+"/metrics", apiToken) // c.hc's timeout bounds it
	if err != nil {
		return raftSample{}, err
	}
	var r raftSample
	var ok bool
	if r.applied, ok = m.Value("outpost_raft_applied_index"); !ok {
		return raftSample{}, fmt.Errorf("%s: no outpost_raft_applied_index in /metrics", n.id)
	}
	r.commands, _ = m.Value("outpost_raft_entry_commands_sum")
	r.term, _ = m.Value("outpost_raft_term")
	return r, nil
}

// measured is the node a phase measures: the leader, waiting up to 10s
// for one (a loaded cluster may be between leaders), else any live node:
// every node applies the same entries, so its applied index measures the
// cluster's raft rate all the same.
func (c *cluster) measured(ctx context.Context) (n *node, leader bool, err error) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		if l, err := c.leader(ctx); err == nil {
			return l, true, nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, n := range c.nodes {
		if n.alive() {
			return n, false, nil
		}
	}
	return nil, false, errors.New("every cloud-sync node has exited")
}
