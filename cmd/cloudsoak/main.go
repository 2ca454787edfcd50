// Command cloudsoak runs a constant push load against a real 3-process
// cloud-sync cluster with a short retention and prints, every -every, each
// node's disk use (state file, raft log, snapshots) and the newest snapshot's
// size, one JSON line per sample, then a summary line: with retention
// working, disk and snapshot size stay flat after the first retention window
// instead of growing with what was pushed.
//
//	make soak                          # 10 minutes, 1-minute retention
//	go run ./cmd/cloudsoak -duration 60s -retention 20s
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/outpost-edge/outpost/internal/benchproc"
	"github.com/outpost-edge/outpost/pkg/cloud/client"
	"github.com/outpost-edge/outpost/pkg/wire"
)

const apiToken = "soak-api-token-0123456789abcdef0123456789"

func edgeToken(e string) string { return "soak-token-0123456789abcdef0123456789-" + e }

type node struct {
	id, raft, http, data string
	cmd                  *exec.Cmd
	done                 chan struct{}
}

func (n *node) url() string { return "http://" + n.http }

// sample is one measurement of the cluster.
type sample struct {
	T        float64 `json:"t_s"`
	Pushed   int64   `json:"readings_pushed"`
	PerNode  []disk  `json:"nodes"`
	MaxDisk  int64   `json:"max_node_disk_bytes"`
	MaxSnap  int64   `json:"max_snapshot_bytes"`
	MaxState int64   `json:"max_state_file_bytes"`
}

type disk struct {
	ID       string `json:"id"`
	State    int64  `json:"state_bytes"`
	RaftLog  int64  `json:"raft_log_bytes"`
	Snaps    int64  `json:"snapshots_bytes"`
	Snapshot int64  `json:"newest_snapshot_bytes"`
	Total    int64  `json:"disk_bytes"`
}

func main() {
	bin := flag.String("bin", "bin/cloud-sync", "cloud-sync binary")
	dur := flag.Duration("duration", 10*time.Minute, "how long to push")
	every := flag.Duration("every", 10*time.Second, "sampling interval")
	retention := flag.Duration("retention", time.Minute, "the nodes' -retention and -log-retention")
	edges := flag.Int("edges", 4, "concurrent pushing edges")
	batch := flag.Int("batch", 50, "readings per push")
	interval := flag.Duration("interval", 100*time.Millisecond, "time between one edge's pushes")
	snapEvery := flag.Duration("snapshot-interval", 10*time.Second, "the nodes' -snapshot-interval")
	flag.Parse()
	if err := run(*bin, *dur, *every, *retention, *snapEvery, *edges, *batch, *interval); err != nil {
		log.Fatalf("cloudsoak: %v", err)
	}
}

func run(bin string, dur, every, retention, snapEvery time.Duration, edges, batch int, interval time.Duration) error {
	dir, err := os.MkdirTemp("", "cloudsoak-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	var nodes []*node
	defer func() {
		for _, n := range nodes {
			if n.cmd != nil && n.cmd.ProcessState == nil {
				_ = n.cmd.Process.Kill()
				<-n.done
			}
		}
	}()
	args := []string{"-retention", retention.String(), "-log-retention", retention.String(),
		"-snapshot-interval", snapEvery.String(), "-snapshot-threshold", "256", "-trailing-logs", "1024"}
	for i := 0; i < 3; i++ {
		n := &node{id: fmt.Sprintf("s%d", i), raft: benchproc.FreeAddr(), http: benchproc.FreeAddr(), data: filepath.Join(dir, fmt.Sprint(i))}
		nodes = append(nodes, n)
		join := ""
		if i > 0 {
			join = nodes[0].url()
		}
		if err := start(bin, n, join, edges, args); err != nil {
			return err
		}
		if i == 0 {
			if err := waitMembers(nodes[:1], 1, 10*time.Second); err != nil {
				return err
			}
		}
	}
	if err := waitMembers(nodes, 3, 20*time.Second); err != nil {
		return err
	}
	urls := make([]string, len(nodes))
	for i, n := range nodes {
		urls[i] = n.url()
	}

	ctx, cancel := context.WithTimeout(context.Background(), dur)
	defer cancel()
	var pushed atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, edges)
	for e := 0; e < edges; e++ {
		wg.Add(1)
		go func(edge string) {
			defer wg.Done()
			if err := pushLoop(ctx, urls, edge, batch, interval, &pushed); err != nil && ctx.Err() == nil {
				errc <- err
			}
		}(fmt.Sprintf("e%d", e))
	}
	begin := time.Now()
	var samples []sample
	t := time.NewTicker(every)
	defer t.Stop()
	enc := json.NewEncoder(os.Stdout)
	measure := func() {
		s := sample{T: time.Since(begin).Round(time.Second).Seconds(), Pushed: pushed.Load()}
		for _, n := range nodes {
			d := measureNode(n)
			s.PerNode = append(s.PerNode, d)
			s.MaxDisk, s.MaxSnap, s.MaxState = max(s.MaxDisk, d.Total), max(s.MaxSnap, d.Snapshot), max(s.MaxState, d.State)
		}
		samples = append(samples, s)
		_ = enc.Encode(s)
	}
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case err := <-errc:
			cancel()
			wg.Wait()
			return err
		case <-t.C:
			measure()
		}
	}
	wg.Wait()
	measure()
	return enc.Encode(summarize(samples, retention))
}

// summarize compares the samples taken after the first two retention
// windows (when deletion has caught up) with each other: flat means the
// last is within 50% of the smallest of them.
func summarize(samples []sample, retention time.Duration) map[string]any {
	out := map[string]any{"summary": true, "samples": len(samples), "retention_s": retention.Seconds()}
	if len(samples) == 0 {
		return out
	}
	last := samples[len(samples)-1]
	out["readings_pushed"] = last.Pushed
	out["final_max_node_disk_bytes"], out["final_max_snapshot_bytes"] = last.MaxDisk, last.MaxSnap
	var steady []sample
	for _, s := range samples {
		if s.T >= 2*retention.Seconds() {
			steady = append(steady, s)
		}
	}
	if len(steady) < 2 {
		out["flat"] = "run longer than two retention windows to judge"
		return out
	}
	minDisk, peakDisk, minSnap, peakSnap := steady[0].MaxDisk, int64(0), steady[0].MaxSnap, int64(0)
	for _, s := range steady {
		minDisk, peakDisk = min(minDisk, s.MaxDisk), max(peakDisk, s.MaxDisk)
		minSnap, peakSnap = min(minSnap, s.MaxSnap), max(peakSnap, s.MaxSnap)
	}
	out["steady_node_disk_bytes"] = [2]int64{minDisk, peakDisk}
	out["steady_snapshot_bytes"] = [2]int64{minSnap, peakSnap}
	out["flat"] = float64(last.MaxDisk) <= 1.5*float64(minDisk) && float64(last.MaxSnap) <= 1.5*float64(max(minSnap, 1))
	return out
}

// pushLoop pushes batch readings stamped now every interval as edge.
func pushLoop(ctx context.Context, urls []string, edge string, batch int, interval time.Duration, pushed *atomic.Int64) error {
	cl, err := client.New(urls, edgeToken(edge))
	if err != nil {
		return err
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	seq := uint64(1)
	for n := 0; ; n++ {
		now := time.Now().UnixMilli()
		b := &wire.PushBatch{Edge: edge, FirstSeq: seq}
		ch := wire.Change{Kind: wire.KindReadings, Device: fmt.Sprintf("%s-d%d", edge, n%16)}
		for i := 0; i < batch; i++ {
			ch.Readings = append(ch.Readings, wire.Reading{TS: now, ID: fmt.Sprintf("%d-%d", n, i),
				Metrics: map[string]float64{"temp": float64(20 + i%10), "hum": float64(40 + n%7)}})
		}
		b.Changes = []wire.Change{ch}
		res, err := cl.Push(ctx, b)
		switch {
		case err == nil:
			seq = res.AckedSeq + 1
			pushed.Add(int64(batch))
		case ctx.Err() != nil:
			return nil
		default:
			var apiErr *client.APIError
			if !errors.As(err, &apiErr) || apiErr.Status != http.StatusTooManyRequests {
				log.Printf("push %s: %v (retrying)", edge, err)
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// measureNode reads a node's disk use from its data directory.
func measureNode(n *node) disk {
	d := disk{ID: n.id, State: fileSize(filepath.Join(n.data, "state.db")), RaftLog: fileSize(filepath.Join(n.data, "raft.db"))}
	var newest time.Time
	_ = filepath.WalkDir(filepath.Join(n.data, "snapshots"), func(path string, e fs.DirEntry, err error) error {
		if err != nil || e.IsDir() {
			return nil
		}
		info, err := e.Info()
		if err != nil {
			return nil
		}
		d.Snaps += info.Size()
		if strings.HasSuffix(path, "state.bin") && info.ModTime().After(newest) {
			newest, d.Snapshot = info.ModTime(), info.Size()
		}
		return nil
	})
	_ = filepath.WalkDir(n.data, func(_ string, e fs.DirEntry, err error) error {
		if err == nil && !e.IsDir() {
			if info, err := e.Info(); err == nil {
				d.Total += info.Size()
			}
		}
		return nil
	})
	return d
}

func fileSize(path string) int64 {
	info, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return info.Size()
}

func start(bin string, n *node, join string, edges int, extra []string) error {
	args := []string{"-id", n.id, "-raft", n.raft, "-http", n.http, "-data", n.data, "-api-token", apiToken, "-log-level", "warn"}
	if join == "" {
		args = append(args, "-bootstrap")
	} else {
		args = append(args, "-join", join)
	}
	for e := 0; e < edges; e++ {
		edge := fmt.Sprintf("e%d", e)
		args = append(args, "-edge-token", edge+"="+edgeToken(edge))
	}
	args = append(args, extra...)
	n.cmd = exec.Command(bin, args...)
	n.cmd.Stderr = os.Stderr
	if err := n.cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", bin, err)
	}
	n.done = make(chan struct{})
	go func() { _ = n.cmd.Wait(); close(n.done) }()
	return nil
}

// waitMembers waits until every node names a leader and the given number of
// members.
func waitMembers(nodes []*node, members int, d time.Duration) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		ok := true
		for _, n := range nodes {
			var env struct {
				Data struct {
					Leader string            `json:"leader"`
					Nodes  []json.RawMessage `json:"nodes"`
				} `json:"data"`
			}
			req, _ := http.NewRequest(http.MethodGet, n.url()+"/cluster/v1/status", nil)
			req.Header.Set("Authorization", "Bearer "+apiToken)
			resp, err := http.DefaultClient.Do(req)
			if err == nil {
				err = json.NewDecoder(resp.Body).Decode(&env)
				resp.Body.Close()
			}
			if err != nil || env.Data.Leader == "" || len(env.Data.Nodes) != members {
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
