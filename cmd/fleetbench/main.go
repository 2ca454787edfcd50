// Command fleetbench simulates a fleet of edges against a real cloud-sync
// cluster on this machine and measures what the fleet costs the cloud. It
// starts the nodes (three by default) on loopback, runs N simulated edges in
// this one process, each with its own credential, its own connections and
// the edge's own client speaking the real sync protocol on the syncer's
// cadence (see simEdge), and prints one JSON line with the figures of three
// phases:
//
//   - idle: every edge connected with nothing to say (heartbeats and pulls
//     only) for a window: cluster CPU, in all and per edge; bytes per pull;
//     raft entries per second. Pulls are long-polls the cloud holds for
//     -pull-wait (the syncer's 25s by default), so a window shorter than
//     that sees under one pull per edge; bytes per pull is over the pulls
//     that ended in the window;
//   - storm: every edge goes away, makes a backlog, and comes back at the
//     same instant: time until every edge's backlog is acknowledged, each
//     edge's lag (its return → its last acknowledgement) at p50, p99 and max,
//     429s;
//     With -profile, each node's CPU profile of the storm is written too;
//   - steady: every edge makes a few readings a second for a window: lag
//     from a reading made to it acknowledged, p50, p99 and max.
//
// Each phase also reports the leader's peak RSS, and the run stops by
// itself: every wait has a deadline and -timeout bounds the whole run;
// the nodes are killed on the way out.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

// options are the run's parameters (the flags).
type options struct {
	bin      string
	nodes    int
	edges    int
	idle     time.Duration
	backlog  int
	rate     float64
	steady   time.Duration
	stormMax time.Duration
	timeout  time.Duration
	pullWait time.Duration // 0: the syncer's default
	// profile, when set, is a directory for each node's CPU profile of the
	// storm's first profileFor (<node id>.pprof; the storm report names
	// the leader).
	profile    string
	profileFor time.Duration
	nodeArgs   []string
	nodeLog    io.Writer // the nodes' stdout and stderr
	logf       func(format string, args ...any)
}

func main() {
	o := options{nodeLog: os.Stderr, logf: log.Printf}
	flag.StringVar(&o.bin, "bin", "bin/cloud-sync", "cloud-sync binary to run")
	flag.IntVar(&o.nodes, "nodes", 3, "cloud-sync nodes in the cluster")
	flag.IntVar(&o.edges, "edges", 1000, "simulated edges")
	flag.DurationVar(&o.idle, "idle", 20*time.Second, "measured window of the idle phase")
	flag.IntVar(&o.backlog, "backlog", 1000, "readings each edge brings to the reconnect storm")
	flag.Float64Var(&o.rate, "rate", 1, "readings per second each edge makes in the steady phase")
	flag.DurationVar(&o.steady, "steady", 20*time.Second, "measured window of the steady phase")
	flag.DurationVar(&o.stormMax, "storm-max", 2*time.Minute, "give up on the storm draining after this")
	flag.DurationVar(&o.timeout, "timeout", 5*time.Minute, "bound of the whole run")
	flag.DurationVar(&o.pullWait, "pull-wait", 0, "long-poll the edges ask for (default the syncer's, 25s; the idle window should span several)")
	flag.StringVar(&o.profile, "profile", "", "directory: write each node's CPU profile of the storm (<id>.pprof) there; every node gets its own -pprof address")
	flag.DurationVar(&o.profileFor, "profile-for", 30*time.Second, "how much of the storm, from its start, -profile covers")
	extra := flag.String("node-args", "", "extra flags for every node, space-separated (e.g. \"-max-pending-bytes 8388608\")")
	flag.Parse()
	o.nodeArgs = strings.Fields(*extra)
	log.SetFlags(log.Ltime | log.Lmicroseconds)
	if err := o.check(); err != nil {
		log.Fatalf("fleetbench: %v", err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	rep, err := run(ctx, o)
	if rep != nil {
		b, _ := json.Marshal(rep)
		fmt.Println(string(b))
	}
	if err != nil {
		stop()
		log.Fatalf("fleetbench: %v", err)
	}
}

func (o *options) check() error {
	switch {
	case o.nodes < 1:
		return fmt.Errorf("-nodes %d: want at least 1", o.nodes)
	case o.edges < 1 || o.edges > 100000:
		return fmt.Errorf("-edges %d: want 1 to 100000", o.edges)
	case o.backlog < 1:
		return fmt.Errorf("-backlog %d: want at least 1", o.backlog)
	case o.rate <= 0 || o.rate > 1000:
		return fmt.Errorf("-rate %v: want more than 0, at most 1000", o.rate)
	case o.profile != "" && o.profileFor < time.Second:
		return fmt.Errorf("-profile-for %s: want at least 1s", o.profileFor)
	case o.idle <= 0 || o.steady <= 0 || o.stormMax <= 0 || o.timeout <= 0:
		return fmt.Errorf("-idle, -steady, -storm-max and -timeout must be positive")
	}
	return nil
}
