package main

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"runtime"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/outpost-edge/outpost/internal/benchproc"
	"github.com/outpost-edge/outpost/pkg/syncer"
)

// report is the JSON line.
type report struct {
	Params params        `json:"params"`
	Idle   *idleReport   `json:"idle,omitempty"`
	Storm  *stormReport  `json:"storm,omitempty"`
	Steady *steadyReport `json:"steady,omitempty"`
	// Over the whole run.
	LeaderRSSPeakMB  float64 `json:"leader_rss_peak_mb"`
	LeaderAnonPeakMB float64 `json:"leader_rss_anon_peak_mb"`
	NodesAlive       int     `json:"nodes_alive"`
	Seconds          float64 `json:"seconds"`
	Error            string  `json:"error,omitempty"`
}

type params struct {
	Edges    int     `json:"edges"`
	Nodes    int     `json:"nodes"`
	IdleS    float64 `json:"idle_s"`
	Backlog  int     `json:"backlog"`
	Rate     float64 `json:"rate"`
	SteadyS  float64 `json:"steady_s"`
	TimeoutS float64 `json:"timeout_s"`
	CPUs     int     `json:"cpus"`
	// The syncer's cadence the edges follow (syncer.DefaultConfig).
	PullIntervalMs      int64 `json:"pull_interval_ms"`
	PullWaitMs          int64 `json:"pull_wait_ms"` // the long-poll the edges ask for
	HeartbeatIntervalMs int64 `json:"heartbeat_interval_ms"`
	PushIdleMs          int64 `json:"push_idle_ms"`
	InFlight            int   `json:"in_flight"`
	BatchReadings       int   `json:"batch_readings"`
}

// load is what every phase reports over its window.
type load struct {
	Seconds float64 `json:"seconds"`
	// CPU seconds per second × 100: 100 is one core busy. The load
	// generator shares the machine's cores with the cluster.
	ClusterCPUPct float64 `json:"cluster_cpu_pct_of_core"`
	LoadgenCPUPct float64 `json:"loadgen_cpu_pct_of_core"`
	// Raft figures are null when the node's /metrics could not be read at
	// both ends of the window (an overloaded node may not answer in time).
	RaftEntriesPerS  *float64 `json:"raft_entries_per_s"`
	RaftCommandsPerS *float64 `json:"raft_commands_per_s"`
	Pulls            int64    `json:"pulls"`
	Heartbeats       int64    `json:"heartbeats"`
	Pushes           int64    `json:"pushes"`
	Throttled        int64    `json:"throttled_429"`
	Server5xx        int64    `json:"server_5xx"`
	TransportErrors  int64    `json:"transport_errors"`
	// Exchanges an edge's loop saw fail after the client's retries (429s
	// not counted), and the first of them.
	Failures     int64  `json:"failures"`
	FirstFailure string `json:"first_failure,omitempty"`
	// Refusals counts the cloud's answers other than 200 (and a gap's
	// 409) by "operation status: message", and transport errors: what the
	// 429s and 5xx were.
	Refusals map[string]int64 `json:"refusals,omitempty"`
	// The node measured (the leader at the window's start, unless there was
	// none for 10s: then leader_rss is that node's) and the elections
	// (raft term changes) it saw in the window.
	Node             string   `json:"node"`
	NodeWasLeader    bool     `json:"node_was_leader"`
	Elections        *float64 `json:"elections"`
	LeaderRSSPeakMB  float64  `json:"leader_rss_peak_mb"`
	LeaderAnonPeakMB float64  `json:"leader_rss_anon_peak_mb"`
	// The largest peak RSS of any node: leadership may move in a window.
	MaxNodeRSSPeakMB float64 `json:"max_node_rss_peak_mb"`
}

type idleReport struct {
	load
	// ClusterCPUPct / edges.
	CPUPerEdgePct     float64 `json:"cpu_per_edge_pct_of_core"`
	BytesPerPull      float64 `json:"bytes_per_pull"`
	BytesPerHeartbeat float64 `json:"bytes_per_heartbeat"`
	PullsPerEdgePerS  float64 `json:"pulls_per_edge_per_s"`
	// Response bodies of every kind, per edge per second.
	BytesPerEdgePerS float64 `json:"bytes_per_edge_per_s"`
	ConnectS         float64 `json:"connect_s"` // start → every edge heartbeated and pulled once
}

type stormReport struct {
	load
	Readings     int     `json:"readings"`
	Complete     bool    `json:"complete"` // every edge drained within -storm-max
	DrainedEdges int     `json:"drained_edges"`
	DrainS       float64 `json:"drain_s"`
	ReadingsPerS float64 `json:"readings_per_s"`
	// Per edge: its return → its last acknowledgement.
	LagP50Ms      float64 `json:"lag_p50_ms"`
	LagP99Ms      float64 `json:"lag_p99_ms"`
	LagMaxMs      float64 `json:"lag_max_ms"`
	MaxOverMedian float64 `json:"max_over_median"`
}

type steadyReport struct {
	load
	Readings int `json:"readings"` // made in the window
	Acked    int `json:"acked"`    // of them, acknowledged (the run waits up to 30s after the window)
	// Per reading: made → acknowledged.
	LagP50Ms float64 `json:"lag_p50_ms"`
	LagP99Ms float64 `json:"lag_p99_ms"`
	LagMaxMs float64 `json:"lag_max_ms"`
}

// fleet is one run: the cluster, the simulated edges and what measures them.
type fleet struct {
	o     options
	cfg   syncer.Config
	c     *cluster
	m     *meter
	edges []*simEdge
	rss   *sampler

	stopEdges context.CancelFunc
	running   sync.WaitGroup
}

func run(ctx context.Context, o options) (*report, error) {
	begin := time.Now()
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	if o.logf == nil {
		o.logf = func(string, ...any) {}
	}
	cfg := syncer.DefaultConfig()
	if o.pullWait > 0 {
		cfg.PullWait = o.pullWait
	}
	rep := &report{Params: params{Edges: o.edges, Nodes: o.nodes, IdleS: o.idle.Seconds(), Backlog: o.backlog, Rate: o.rate,
		SteadyS: o.steady.Seconds(), TimeoutS: o.timeout.Seconds(), CPUs: runtime.NumCPU(),
		PullIntervalMs: cfg.PullInterval.Milliseconds(), PullWaitMs: cfg.PullWait.Milliseconds(), HeartbeatIntervalMs: cfg.HeartbeatInterval.Milliseconds(),
		PushIdleMs: cfg.Idle.Milliseconds(), InFlight: cfg.InFlight, BatchReadings: cfg.BatchReadings}}

	dir, err := os.MkdirTemp("", "fleetbench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	ids := make([]string, o.edges)
	width := len(strconv.Itoa(o.edges - 1))
	for i := range ids {
		ids[i] = fmt.Sprintf("fleet-%0*d", width, i)
	}
	f := &fleet{o: o, cfg: cfg, m: &meter{}, rss: &sampler{},
		c: &cluster{bin: o.bin, args: nodeArgs(o), pprof: o.profile != "", log: o.nodeLog, hc: &http.Client{Timeout: 20 * time.Second}}}
	defer f.c.stop() // runs before the data directory is removed
	finish := func(err error) (*report, error) {
		f.halt()
		f.rss.sample()
		rep.LeaderRSSPeakMB, rep.LeaderAnonPeakMB = round(f.rss.allPeak), round(f.rss.allAnon)
		rep.NodesAlive = f.c.aliveCount()
		rep.Seconds = round(time.Since(begin).Seconds())
		if err == nil && ctx.Err() != nil {
			err = fmt.Errorf("run did not finish within -timeout %s", o.timeout)
		}
		if err != nil {
			rep.Error = err.Error()
		}
		return rep, err
	}
	o.logf("starting %d cloud-sync nodes (%s)", o.nodes, o.bin)
	if err := f.c.start(ctx, dir, o.nodes, ids); err != nil {
		return finish(err)
	}
	urls := make([]string, len(f.c.nodes))
	for i, n := range f.c.nodes {
		urls[i] = n.url()
	}
	for i, id := range ids {
		e, err := newSimEdge(i, id, urls, cfg, f.m)
		if err != nil {
			return finish(err)
		}
		defer e.cl.Close()
		f.edges = append(f.edges, e)
	}
	sampleCtx, stopSampling := context.WithCancel(ctx)
	defer stopSampling()
	go f.rss.run(sampleCtx, 200*time.Millisecond)

	if rep.Idle, err = f.idlePhase(ctx); err != nil {
		return finish(err)
	}
	if rep.Storm, err = f.stormPhase(ctx); err != nil {
		return finish(err)
	}
	rep.Steady, err = f.steadyPhase(ctx)
	return finish(err)
}

// start runs every edge's loops until halt.
func (f *fleet) start(ctx context.Context) {
	ctx, f.stopEdges = context.WithCancel(ctx)
	for _, e := range f.edges {
		f.running.Add(1)
		go func() { defer f.running.Done(); e.run(ctx) }()
	}
}

// halt stops every edge's loops: their requests end with the context, so
// this is quick; it waits at most 30s.
func (f *fleet) halt() {
	if f.stopEdges == nil {
		return
	}
	f.stopEdges()
	f.stopEdges = nil
	done := make(chan struct{})
	go func() { f.running.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		f.o.logf("some simulated edges did not stop within 30s")
	}
}

// waitUntil polls cond every 20ms until it holds, for at most d.
func waitUntil(ctx context.Context, d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) || !sleep(ctx, 20*time.Millisecond) {
			return cond()
		}
	}
}

func (f *fleet) idlePhase(ctx context.Context) (*idleReport, error) {
	t0 := time.Now()
	f.start(ctx)
	// Connecting is bounded by the fleet's size: a heartbeat and a pull
	// each, through a cloud that may serve a few hundred a second.
	connect := 30*time.Second + time.Duration(len(f.edges))*80*time.Millisecond
	ready := func() int {
		k := 0
		for _, e := range f.edges {
			if e.ready.Load() {
				k++
			}
		}
		return k
	}
	if !waitUntil(ctx, connect, func() bool { return ready() == len(f.edges) }) {
		return nil, fmt.Errorf("idle: only %d of %d edges had a heartbeat and a pull succeed within %s", ready(), len(f.edges), connect)
	}
	connected := time.Since(t0)
	f.o.logf("idle: %d edges connected in %s; measuring %s", len(f.edges), connected.Round(time.Millisecond), f.o.idle)
	// Settle: the push loops' first heartbeats done, the directory
	// changes of the last edges to connect delivered, and the edges' first
	// pull positions recorded (the leader does that in one raft entry every
	// 5 s, only when a position moved, which an idle edge's does not), so
	// the window sees the idle fleet only. The leader wakes the pulls it
	// holds for directory changes at most once a second, but a pull a
	// follower holds learns of them only at the end of its wait: so wait
	// one whole hold, or the window counts each such edge's one catch-up
	// delta from the connect (at 1,000 edges that made an "idle" pull
	// average 14 KB, where each is about 200 bytes).
	if !sleep(ctx, f.cfg.PullWait+f.cfg.PullInterval+6500*time.Millisecond) {
		return nil, ctx.Err()
	}
	s0, err := f.begin(ctx)
	if err != nil {
		return nil, err
	}
	if !sleep(ctx, f.o.idle) {
		return nil, ctx.Err()
	}
	s1 := f.end(s0)
	r := &idleReport{load: f.load(s0, s1), ConnectS: round3(connected.Seconds())}
	d, n := s1.m.sub(s0.m), float64(len(f.edges))
	secs := s1.at.Sub(s0.at).Seconds()
	r.CPUPerEdgePct = sig(r.ClusterCPUPct / n)
	r.BytesPerPull = round(ratio(d.bytes[opPull], d.ok[opPull]))
	r.BytesPerHeartbeat = round(ratio(d.bytes[opHeartbeat], d.ok[opHeartbeat]))
	r.PullsPerEdgePerS = sig(float64(d.ok[opPull]) / n / secs)
	total := int64(0)
	for _, b := range d.bytes {
		total += b
	}
	r.BytesPerEdgePerS = round(float64(total) / n / secs)
	return r, nil
}

func (f *fleet) stormPhase(ctx context.Context) (*stormReport, error) {
	f.halt() // the whole fleet goes away …
	now := time.Now()
	for _, e := range f.edges {
		e.add(f.o.backlog, now) // … makes a backlog …
		e.drainTo()
	}
	f.o.logf("storm: %d edges × %d readings arrive at once", len(f.edges), f.o.backlog)
	s0, err := f.begin(ctx)
	if err != nil {
		return nil, err
	}
	t0 := time.Now()
	profiled := func() {}
	if f.o.profile != "" {
		f.o.logf("storm: profiling every node for %s into %s (the leader is %s)", f.o.profileFor, f.o.profile, s0.node.id)
		profiled = f.c.profile(ctx, f.o.profile, f.o.profileFor, f.o.logf)
	}
	f.start(ctx) // … and comes back at once
	drainedCount := func() int {
		k := 0
		for _, e := range f.edges {
			if _, _, ok := e.drained(); ok {
				k++
			}
		}
		return k
	}
	complete := waitUntil(ctx, f.o.stormMax, func() bool { return drainedCount() == len(f.edges) })
	s1 := f.end(s0)
	profiled()
	if ctx.Err() != nil {
		return nil, fmt.Errorf("storm: %d of %d edges drained: %w", drainedCount(), len(f.edges), ctx.Err())
	}
	r := &stormReport{load: f.load(s0, s1), Readings: len(f.edges) * f.o.backlog, Complete: complete}
	var lags []time.Duration
	var last time.Time
	for _, e := range f.edges {
		if at, started, ok := e.drained(); ok {
			lags = append(lags, at.Sub(started))
			if at.After(last) {
				last = at
			}
		}
	}
	r.DrainedEdges = len(lags)
	if len(lags) > 0 {
		r.DrainS = round3(last.Sub(t0).Seconds())
		r.ReadingsPerS = round(float64(len(lags)*f.o.backlog) / last.Sub(t0).Seconds())
		r.LagP50Ms, r.LagP99Ms, r.LagMaxMs = percentiles(lags)
		if r.LagP50Ms > 0 {
			r.MaxOverMedian = round(r.LagMaxMs / r.LagP50Ms)
		}
	}
	f.o.logf("storm: %d of %d edges drained in %.1fs", r.DrainedEdges, len(f.edges), r.DrainS)
	return r, nil
}

func (f *fleet) steadyPhase(ctx context.Context) (*steadyReport, error) {
	f.o.logf("steady: %v readings/s per edge for %s", f.o.rate, f.o.steady)
	s0, err := f.begin(ctx)
	if err != nil {
		return nil, err
	}
	since := time.Now()
	for _, e := range f.edges {
		e.setLagSince(since)
	}
	// Each edge makes a reading every period, starting at a random point of
	// the first one so that the fleet's readings spread over time.
	period := time.Duration(float64(time.Second) / f.o.rate)
	made := make([]int, len(f.edges))
	var wg sync.WaitGroup
	window, stop := context.WithTimeout(ctx, f.o.steady)
	defer stop()
	for i, e := range f.edges {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if !sleep(window, time.Duration(rand.Int64N(int64(period)))) {
				return
			}
			t := time.NewTicker(period)
			defer t.Stop()
			for window.Err() == nil {
				e.add(1, time.Now())
				made[i]++
				select {
				case <-window.Done():
				case <-t.C:
				}
			}
		}()
	}
	wg.Wait()
	s1 := f.end(s0)
	if ctx.Err() != nil {
		return nil, fmt.Errorf("steady: %w", ctx.Err())
	}
	total := 0
	for _, k := range made {
		total += k
	}
	// Bounded wait for the window's last readings to be acknowledged.
	waitUntil(ctx, 30*time.Second, func() bool {
		for _, e := range f.edges {
			if e.pending.Load() {
				return false
			}
		}
		return true
	})
	r := &steadyReport{load: f.load(s0, s1), Readings: total}
	var lags []time.Duration
	for _, e := range f.edges {
		l := e.takeLags()
		lags = append(lags, l...)
	}
	r.Acked = len(lags)
	r.LagP50Ms, r.LagP99Ms, r.LagMaxMs = percentiles(lags)
	return r, nil
}

// snap is one side of a measured window.
type snap struct {
	node      *node
	leader    bool
	at        time.Time
	cpu, self float64
	m         meterSnap
	raft      raftSample
	raftOK    bool
}

// begin starts a measured window on the leader (see cluster.measured). The
// node's /metrics page (large: it has per-edge series) is scraped before
// the CPU is read here and after it in end, so the scrapes' cost stays out
// of the window.
func (f *fleet) begin(ctx context.Context) (snap, error) {
	n, leader, err := f.c.measured(ctx)
	if err != nil {
		return snap{}, err
	}
	s := snap{node: n, leader: leader}
	s.raft, err = f.c.raftStats(n)
	s.raftOK = err == nil
	f.m.first() // a window's first failure is its own
	f.rss.watch(n.cmd.Process.Pid, f.c.pids())
	s.at, s.cpu, s.self, s.m = time.Now(), f.c.cpu(), selfCPU(), f.m.snap()
	return s, nil
}

func (f *fleet) end(s0 snap) snap {
	s := snap{node: s0.node, leader: s0.leader}
	s.at, s.cpu, s.self, s.m = time.Now(), f.c.cpu(), selfCPU(), f.m.snap()
	f.rss.sample()
	var err error
	s.raft, err = f.c.raftStats(s.node)
	s.raftOK = err == nil
	return s
}

func (f *fleet) load(a, b snap) load {
	secs := b.at.Sub(a.at).Seconds()
	d := b.m.sub(a.m)
	l := load{Seconds: round(secs), ClusterCPUPct: sig((b.cpu - a.cpu) / secs * 100), LoadgenCPUPct: sig((b.self - a.self) / secs * 100),
		Pulls: d.ok[opPull], Heartbeats: d.ok[opHeartbeat], Pushes: d.ok[opPush],
		Throttled: d.throttled, Server5xx: d.server5xx, TransportErrors: d.transport, Failures: d.failures,
		Node: a.node.id, NodeWasLeader: a.leader}
	if len(d.refusals) > 0 {
		l.Refusals = d.refusals
	}
	if a.raftOK && b.raftOK {
		l.RaftEntriesPerS = ptr(sig((b.raft.applied - a.raft.applied) / secs))
		l.RaftCommandsPerS = ptr(sig((b.raft.commands - a.raft.commands) / secs))
		l.Elections = ptr(b.raft.term - a.raft.term)
	}
	if d.failures > 0 {
		l.FirstFailure = f.m.first()
	}
	l.LeaderRSSPeakMB, l.LeaderAnonPeakMB, l.MaxNodeRSSPeakMB = f.rss.phasePeak()
	return l
}

// sampler tracks the measured node's resident memory, and the largest of
// any node's.
type sampler struct {
	mu               sync.Mutex
	pid              int
	pids             []int
	peak, anon, any  float64 // since watch
	allPeak, allAnon float64
}

func (s *sampler) run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			s.sample()
		}
	}
}

// watch starts a phase: pid is the measured node's, pids every node's; the
// phase's peaks start over.
func (s *sampler) watch(pid int, pids []int) {
	s.mu.Lock()
	s.pid, s.pids, s.peak, s.anon, s.any = pid, pids, 0, 0, 0
	s.mu.Unlock()
	s.sample()
}

func (s *sampler) sample() {
	s.mu.Lock()
	pid, pids := s.pid, s.pids
	s.mu.Unlock()
	if pid == 0 {
		return
	}
	st := benchproc.StatusMB(pid)
	most := 0.0
	for _, p := range pids {
		most = max(most, benchproc.StatusMB(p)["VmRSS"])
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.peak, s.anon, s.any = max(s.peak, st["VmRSS"]), max(s.anon, st["RssAnon"]), max(s.any, most)
	s.allPeak, s.allAnon = max(s.allPeak, s.peak), max(s.allAnon, s.anon)
}

func (s *sampler) phasePeak() (rss, anon, anyNode float64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return round(s.peak), round(s.anon), round(s.any)
}

// selfCPU is the user+system CPU seconds this process has used.
func selfCPU() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// percentiles are p50, p99 and max of ds in milliseconds (0 for none).
func percentiles(ds []time.Duration) (p50, p99, maxMs float64) {
	if len(ds) == 0 {
		return 0, 0, 0
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	at := func(q float64) float64 { return ms(ds[int(math.Round(q*float64(len(ds)-1)))]) }
	return at(0.5), at(0.99), ms(ds[len(ds)-1])
}

func ms(d time.Duration) float64 { return round(float64(d.Microseconds()) / 1000) }

func ptr(f float64) *float64 { return &f }

func ratio(a, b int64) float64 {
	if b == 0 {
		return 0
	}
	return float64(a) / float64(b)
}

func round(f float64) float64  { return math.Round(f*10) / 10 }
func round3(f float64) float64 { return math.Round(f*1000) / 1000 }

// sig rounds to 3 significant digits: per-edge figures are small.
func sig(f float64) float64 {
	if f == 0 || math.IsNaN(f) || math.IsInf(f, 0) {
		return 0
	}
	p := math.Pow(10, 2-math.Floor(math.Log10(math.Abs(f))))
	return math.Round(f*p) / p
}

// nodeArgs are the flags every node gets: the per-address connection cap
// raised for the fleet (every simulated edge, and every node forwarding to
// the leader, connects from 127.0.0.1, where a real fleet comes from as
// many addresses as edges: each edge holds a connection for its long-poll,
// and a follower one to the leader for each held pull it forwards), then
// -node-args, which may override it.
func nodeArgs(o options) []string {
	perIP := max(1024, 4*o.edges+256)
	return append([]string{"-max-conns", strconv.Itoa(max(16384, perIP)), "-max-conns-per-ip", strconv.Itoa(perIP)}, o.nodeArgs...)
}
