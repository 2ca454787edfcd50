// Command cloudbench measures a 3-process cloud-sync cluster on this machine:
// committed readings per second pushed through /sync/v1/push in batches of 1,
// 100 and 5000 readings, the leader's peak RSS while absorbing the large
// batches, and failover time (leader kill -9 → first acknowledged write). It
// prints one JSON line.
//
// Every pusher is its own edge (sequence numbers are per edge, so one edge's
// pushes are serial by design) and talks to the leader first, falling back
// to the other nodes like a real edge.
//
// -tls runs with everything on: the nodes use cluster mutual TLS and serve
// https with a public certificate, and the pushers speak https, all from a
// development CA made in the run's temp dir.
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/outpost-edge/outpost/internal/benchproc"
	"github.com/outpost-edge/outpost/internal/devcerts"
	"github.com/outpost-edge/outpost/pkg/certs"
	"github.com/outpost-edge/outpost/pkg/cloud/client"
	"github.com/outpost-edge/outpost/pkg/wire"
)

const apiToken = "bench-api-token-0123456789abcdef0123456789"

// nodeArgs are extra flags for every node, from -node-args.
var nodeArgs []string

// loadgen is the pushers' HTTP client, from -loadgen.
var loadgen string

// pushers1 is the number of single-reading pushers, from -pushers.
var pushers1 = 64

// With -tls: the nodes run cluster mutual TLS and serve https with a
// public certificate from a development CA made in the run's temp dir;
// clientTLS trusts that CA, and hc (status and metrics) uses it.
var (
	tlsOn     bool
	certSet   *devcerts.Set
	clientTLS *tls.Config
	hc        = http.DefaultClient
)

func edgeToken(e string) string { return "bench-token-0123456789abcdef0123456789-" + e }

type node struct {
	id, raft, http, data string
	admin                string // pprof address, with -profile
	cmd                  *exec.Cmd
	done                 chan struct{}
}

func (n *node) url() string {
	if tlsOn {
		return "https://" + n.http
	}
	return "http://" + n.http
}

type phase struct {
	Batch        int     `json:"batch"`
	Pushers      int     `json:"pushers"`
	Seconds      float64 `json:"seconds"`
	Readings     int64   `json:"readings"`
	ReadingsPerS float64 `json:"readings_per_s"`
	PushesPerS   float64 `json:"pushes_per_s"`
	P50Ms        float64 `json:"p50_ms"`
	P99Ms        float64 `json:"p99_ms"`
	Throttled    int64   `json:"throttled_429"`
	LeaderRSSMB  float64 `json:"leader_rss_peak_mb"`
	// Anonymous (heap) part of the peak; the rest is bbolt's memory-mapped
	// files, which the kernel reclaims under pressure.
	LeaderAnonMB float64 `json:"leader_rss_anon_peak_mb"`
	// CPU seconds all three nodes used per 100k committed readings: a
	// measure that holds up when other work shares the machine.
	ClusterCPUPer100k float64 `json:"cluster_cpu_s_per_100k_readings"`
	// The load generator's own CPU per 100k readings: it shares the two
	// cores with the cluster.
	LoadgenCPUPer100k float64 `json:"loadgen_cpu_s_per_100k_readings"`
	// Raft entries the leader proposed per second and the mean number of
	// pushes group-committed into one.
	EntriesPerS  float64 `json:"raft_entries_per_s"`
	CmdsPerEntry float64 `json:"commands_per_entry"`
}

func main() {
	bin := flag.String("bin", "bin/cloud-sync", "cloud-sync binary to benchmark")
	dur := flag.Duration("duration", 8*time.Second, "measured time per phase")
	extra := flag.String("node-args", "", "extra flags for every node, space-separated (e.g. \"-config tuned.yaml\")")
	only := flag.String("phases", "1,100,5000", "batch sizes to run, comma-separated (a subset of 1,100,5000)")
	profile := flag.String("profile", "", "directory: write the leader's and a follower's CPU profiles of each phase there")
	failoverOn := flag.Bool("failover", true, "measure failover after the phases")
	flag.IntVar(&pushers1, "pushers", 64, "concurrent pushers of the single-reading phase")
	flag.BoolVar(&tlsOn, "tls", false, "run with everything on: cluster mutual TLS and https to the nodes (development certificates in the temp dir)")
	flag.StringVar(&loadgen, "loadgen", "raw", "pushers' HTTP client: raw (lean HTTP/1.1, the default) or client (pkg/cloud/client, as an edge pushes)")
	flag.Parse()
	if loadgen != "raw" && loadgen != "client" {
		log.Fatalf("cloudbench: -loadgen must be raw or client")
	}
	nodeArgs = strings.Fields(*extra)
	if err := run(*bin, *dur, *only, *profile, *failoverOn); err != nil {
		log.Fatalf("cloudbench: %v", err)
	}
}

func run(bin string, dur time.Duration, only, profDir string, doFailover bool) error {
	want := map[int]bool{}
	for _, f := range strings.Split(only, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil {
			return fmt.Errorf("-phases: %q is not a batch size", f)
		}
		want[n] = true
	}
	dir, err := os.MkdirTemp("", "cloudbench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if tlsOn {
		if err := makeCerts(filepath.Join(dir, "certs")); err != nil {
			return err
		}
	}
	var nodes []*node
	defer func() {
		for _, n := range nodes {
			if n.cmd != nil && n.cmd.ProcessState == nil {
				_ = n.cmd.Process.Kill()
				<-n.done
			}
		}
	}()
	for i := 0; i < 3; i++ {
		n := &node{id: fmt.Sprintf("b%d", i), raft: benchproc.FreeAddr(), http: benchproc.FreeAddr(), data: filepath.Join(dir, fmt.Sprint(i))}
		if profDir != "" {
			n.admin = benchproc.FreeAddr()
		}
		nodes = append(nodes, n)
		join := ""
		if i > 0 {
			join = nodes[0].url()
		}
		if err := start(bin, n, join); err != nil {
			return err
		}
		if i == 0 {
			if err := waitLeaderCount(nodes[:1], 1, 10*time.Second); err != nil {
				return err
			}
		}
	}
	if err := waitLeaderCount(nodes, 3, 20*time.Second); err != nil {
		return err
	}
	out := map[string]any{"cpus": runtime.NumCPU(), "nodes": 3, "loadgen": loadgen}
	var phases []phase
	edgeBase := 0
	for _, p := range []struct{ batch, pushers int }{{1, pushers1}, {100, 16}, {5000, 8}} {
		if !want[p.batch] {
			continue
		}
		lead, err := leader(nodes)
		if err != nil {
			return err
		}
		stopProf := profileNodes(nodes, lead, profDir, p.batch, dur)
		ph, err := runPhase(nodes, lead, p.batch, p.pushers, edgeBase, dur)
		stopProf()
		if err != nil {
			return err
		}
		edgeBase += p.pushers
		phases = append(phases, ph)
	}
	out["phases"] = phases
	if doFailover {
		fo, err := failover(nodes, edgeBase)
		if err != nil {
			return err
		}
		out["failover_ms"] = fo
	}
	j, _ := json.Marshal(out)
	fmt.Println(string(j))
	return nil
}

// makeCerts writes the -tls run's development CA, one cluster certificate
// per node and the public "server" certificate.
func makeCerts(dir string) error {
	set, err := devcerts.Write(dir, devcerts.Options{Names: []string{"b0", "b1", "b2", "server"}})
	if err != nil {
		return err
	}
	pool, err := certs.LoadPool(set.CA)
	if err != nil {
		return err
	}
	certSet, clientTLS = set, &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	hc = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: clientTLS}}
	return nil
}

func start(bin string, n *node, join string) error {
	args := []string{"-id", n.id, "-raft", n.raft, "-http", n.http, "-data", n.data, "-api-token", apiToken, "-log-level", "warn"}
	if join == "" {
		args = append(args, "-bootstrap")
	} else {
		args = append(args, "-join", join)
	}
	for e := 0; e < 256; e++ {
		edge := fmt.Sprintf("e%d", e)
		args = append(args, "-edge-token", edge+"="+edgeToken(edge))
	}
	if n.admin != "" {
		args = append(args, "-pprof", n.admin)
	}
	if tlsOn {
		args = append(args, certSet.ClusterArgs(n.id)...)
		args = append(args, certSet.TLSArgs("server")...)
	}
	args = append(args, nodeArgs...)
	log.Printf("node %s http %s", n.id, n.url())
	n.cmd = exec.Command(bin, args...)
	n.cmd.Stderr = os.Stderr
	if err := n.cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", bin, err)
	}
	n.done = make(chan struct{})
	go func() { _ = n.cmd.Wait(); close(n.done) }()
	return nil
}

type status struct {
	Leader string `json:"leader"`
	Nodes  []struct {
		ID string `json:"id"`
	} `json:"nodes"`
}

func getStatus(n *node) (status, error) {
	var env struct {
		Data status `json:"data"`
	}
	req, err := http.NewRequest(http.MethodGet, n.url()+"/cluster/v1/status", nil)
	if err != nil {
		return env.Data, err
	}
	req.Header.Set("Authorization", "Bearer "+apiToken)
	resp, err := hc.Do(req)
	if err != nil {
		return env.Data, err
	}
	defer resp.Body.Close()
	return env.Data, json.NewDecoder(resp.Body).Decode(&env)
}

func waitLeaderCount(nodes []*node, members int, d time.Duration) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		ok := true
		for _, n := range nodes {
			st, err := getStatus(n)
			if err != nil || st.Leader == "" || len(st.Nodes) != members {
				ok = false
				break
			}
		}
		if ok {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("cluster of %d did not form within %s", members, d)
}

func leader(nodes []*node) (*node, error) {
	for _, n := range nodes {
		if n.cmd.ProcessState != nil {
			continue
		}
		st, err := getStatus(n)
		if err != nil || st.Leader == "" {
			continue
		}
		for _, m := range nodes {
			if m.id == st.Leader {
				return m, nil
			}
		}
	}
	return nil, errors.New("no leader")
}

// urlsLeaderFirst lists the live nodes' URLs with the leader first.
func urlsLeaderFirst(nodes []*node, lead *node) []string {
	urls := []string{lead.url()}
	for _, n := range nodes {
		if n != lead && n.cmd.ProcessState == nil {
			urls = append(urls, n.url())
		}
	}
	return urls
}

// pusher is what a phase's pushers push through.
type pusher interface {
	Push(ctx context.Context, b *wire.PushBatch) error
	Close()
}

func newPusher(urls []string, leaderAddr, token string) (pusher, error) {
	if loadgen == "raw" {
		return newRawPusher(leaderAddr, token)
	}
	cl, err := client.New(urls, token, client.WithTLSConfig(clientTLS))
	return clientPusher{cl}, err
}

type clientPusher struct{ *client.Client }

func (c clientPusher) Push(ctx context.Context, b *wire.PushBatch) error {
	_, err := c.Client.Push(ctx, b)
	return err
}

// runPhase runs pushers concurrent edges, each pushing batches of size
// readings back to back, and counts what the cluster acknowledged during
// the measured window (after a one-second warm-up).
func runPhase(nodes []*node, lead *node, size, pushers, edgeBase int, dur time.Duration) (phase, error) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var (
		measuring atomic.Bool
		readings  atomic.Int64
		pushes    atomic.Int64
		throttled atomic.Int64
		latMu     sync.Mutex
		lats      []time.Duration
		wg        sync.WaitGroup
		firstErr  atomic.Value
	)
	urls := urlsLeaderFirst(nodes, lead)
	for p := 0; p < pushers; p++ {
		edge := fmt.Sprintf("e%d", edgeBase+p)
		cl, err := newPusher(urls, lead.http, edgeToken(edge))
		if err != nil {
			return phase{}, err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer cl.Close()
			b := &wire.PushBatch{Edge: edge, Changes: []wire.Change{{Kind: wire.KindReadings, Device: "dev-" + edge}}}
			rs := make([]wire.Reading, size)
			for i := range rs {
				rs[i].Metrics = map[string]float64{"temp": 21.5, "hum": 40}
			}
			b.Changes[0].Readings = rs
			base := time.Now().UnixMilli() * 10
			for seq := uint64(1); ctx.Err() == nil; {
				b.FirstSeq = seq
				for i := range rs {
					rs[i].TS = base + int64(seq)*int64(size) + int64(i) // unique: no duplicates
				}
				t0 := time.Now()
				err := cl.Push(ctx, b)
				var th *client.ThrottledError
				switch {
				case err == nil:
					seq++
					if measuring.Load() {
						readings.Add(int64(size))
						pushes.Add(1)
						latMu.Lock()
						lats = append(lats, time.Since(t0))
						latMu.Unlock()
					}
				case errors.As(err, &th):
					throttled.Add(1)
					select {
					case <-time.After(th.RetryAfter):
					case <-ctx.Done():
					}
				case ctx.Err() != nil:
				case errors.Is(err, errRetry):
					time.Sleep(10 * time.Millisecond)
				default:
					firstErr.CompareAndSwap(nil, err)
					return
				}
			}
		}()
	}
	time.Sleep(time.Second) // warm-up
	peak, anon := 0.0, 0.0
	cpu0, self0 := clusterCPU(nodes), selfCPU()
	cnt0, sum0 := entryCommands(lead)
	measuring.Store(true)
	t0 := time.Now()
	tick := time.NewTicker(100 * time.Millisecond)
	for time.Since(t0) < dur {
		<-tick.C
		st := benchproc.StatusMB(lead.cmd.Process.Pid)
		peak, anon = max(peak, st["VmRSS"]), max(anon, st["RssAnon"])
	}
	tick.Stop()
	measuring.Store(false)
	elapsed := time.Since(t0).Seconds()
	cpu, self := clusterCPU(nodes)-cpu0, selfCPU()-self0
	cnt1, sum1 := entryCommands(lead)
	cancel()
	wg.Wait()
	if err, _ := firstErr.Load().(error); err != nil {
		return phase{}, fmt.Errorf("batch %d: %w", size, err)
	}
	sort.Slice(lats, func(i, j int) bool { return lats[i] < lats[j] })
	pct := func(q float64) float64 {
		if len(lats) == 0 {
			return 0
		}
		return float64(lats[int(q*float64(len(lats)-1))].Microseconds()) / 1000
	}
	return phase{Batch: size, Pushers: pushers, Seconds: round(elapsed), Readings: readings.Load(),
		ReadingsPerS: round(float64(readings.Load()) / elapsed), PushesPerS: round(float64(pushes.Load()) / elapsed),
		P50Ms: pct(0.5), P99Ms: pct(0.99), Throttled: throttled.Load(), LeaderRSSMB: round(peak), LeaderAnonMB: round(anon),
		ClusterCPUPer100k: per100k(cpu, readings.Load()), LoadgenCPUPer100k: per100k(self, readings.Load()),
		EntriesPerS: round((cnt1 - cnt0) / elapsed), CmdsPerEntry: round((sum1 - sum0) / max(cnt1-cnt0, 1))}, nil
}

// entryCommands reads the leader's count of group-committed entries and the
// sum of the commands in them.
func entryCommands(lead *node) (entries, commands float64) {
	m, err := benchproc.ScrapeAuth(hc, lead.url()+"/metrics", apiToken)
	if err != nil {
		return 0, 0
	}
	entries, _ = m.Value("outpost_raft_entry_commands_count")
	commands, _ = m.Value("outpost_raft_entry_commands_sum")
	return entries, commands
}

func per100k(cpu float64, readings int64) float64 {
	return float64(int64(cpu/float64(max(readings, 1))*1e5*1000)) / 1000
}

// selfCPU is the user+system CPU seconds this process has used.
func selfCPU() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// profileNodes fetches CPU profiles of the leader and one follower covering
// the measured window of a phase (which starts after a one-second warm-up)
// into dir as <role>-<batch>.pprof. The returned func waits for them.
func profileNodes(nodes []*node, lead *node, dir string, batch int, dur time.Duration) func() {
	if dir == "" {
		return func() {}
	}
	var wg sync.WaitGroup
	follower := false
	for _, n := range nodes {
		role := "leader"
		if n != lead {
			if follower {
				continue
			}
			role, follower = "follower", true
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			time.Sleep(time.Second)
			url := fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", n.admin, int(dur.Seconds()))
			resp, err := http.Get(url)
			if err != nil {
				log.Printf("profile %s: %v", n.id, err)
				return
			}
			defer resp.Body.Close()
			f, err := os.Create(filepath.Join(dir, fmt.Sprintf("%s-%d.pprof", role, batch)))
			if err != nil {
				log.Printf("profile %s: %v", n.id, err)
				return
			}
			defer f.Close()
			_, _ = io.Copy(f, resp.Body)
		}()
	}
	return wg.Wait
}

// clusterCPU is the user+system CPU seconds the live nodes have used.
func clusterCPU(nodes []*node) float64 {
	total := 0.0
	for _, n := range nodes {
		if n.cmd.ProcessState != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", n.cmd.Process.Pid))
		if err != nil {
			continue
		}
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
		ut, _ := strconv.ParseFloat(f[11], 64)
		st, _ := strconv.ParseFloat(f[12], 64)
		total += (ut + st) / 100 // clock ticks; USER_HZ is 100 on Linux
	}
	return total
}

func round(f float64) float64 { return float64(int64(f*10)) / 10 }

// failover keeps a few edges writing, kills the leader with SIGKILL, and
// measures until the first write acknowledged after the kill.
func failover(nodes []*node, edgeBase int) (float64, error) {
	lead, err := leader(nodes)
	if err != nil {
		return 0, err
	}
	var survivors []string
	for _, n := range nodes {
		if n != lead {
			survivors = append(survivors, n.url())
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var killed atomic.Int64 // unix ns of the kill
	first := make(chan time.Time, 16)
	var wg sync.WaitGroup
	for p := 0; p < 4; p++ {
		edge := fmt.Sprintf("e%d", edgeBase+p)
		// Each prober knows every node, the leader first, as an edge would.
		cl, err := client.New(append([]string{lead.url()}, survivors...), edgeToken(edge), client.WithTLSConfig(clientTLS))
		if err != nil {
			return 0, err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer cl.Close()
			for seq := uint64(1); ctx.Err() == nil; {
				sent := time.Now()
				b := &wire.PushBatch{Edge: edge, FirstSeq: seq, Changes: []wire.Change{{Kind: wire.KindReadings, Device: "fo-" + edge,
					Readings: []wire.Reading{{TS: int64(seq), Metrics: map[string]float64{"v": 1}}}}}}
				if _, err := cl.Push(ctx, b); err == nil {
					seq++
					if k := killed.Load(); k != 0 && sent.UnixNano() > k {
						select {
						case first <- time.Now():
						default:
						}
					}
				}
			}
		}()
	}
	time.Sleep(time.Second)
	t0 := time.Now()
	_ = lead.cmd.Process.Signal(syscall.SIGKILL)
	killed.Store(t0.UnixNano())
	<-lead.done
	var ms float64
	select {
	case t := <-first:
		ms = float64(t.Sub(t0).Microseconds()) / 1000
	case <-ctx.Done():
		return 0, errors.New("no write acknowledged within 30s of killing the leader")
	}
	cancel()
	wg.Wait()
	return ms, nil
}
