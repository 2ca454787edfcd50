// Command syncbench measures edge→cloud reconciliation on this machine with
// the real binaries: it builds a backlog of readings on an edge whose cloud
// link is cut (publishing arrays of readings to the edge's embedded broker),
// with a 3-node cloud-sync cluster already running behind the cut, then heals
// the link and reports the seconds until the cloud has committed every
// reading, the readings per second that makes, the live-sync latency
// (publish → committed in the cloud) p50 and p99 of single readings
// published afterwards, and the peak RSS of the edge and of the largest
// cloud node. It prints one JSON line. -tls runs with cluster mutual TLS and
// edge→cloud https (-cloud-ca), from a development CA in the temp dir.
package main

import (
	"bufio"
	"bytes"
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
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/outpost-edge/outpost/internal/benchproc"
	"github.com/outpost-edge/outpost/internal/devcerts"
	"github.com/outpost-edge/outpost/internal/tcpproxy"
	"github.com/outpost-edge/outpost/pkg/certs"
)

const (
	apiToken  = "syncbench-api-token-0123456789abcdef0123456789"
	edgeID    = "bench-edge"
	edgeToken = "syncbench-edge-token-0123456789abcdef0123456789"
)

// With -tls everything is on: the cloud nodes run cluster mutual TLS and
// serve https, and the edge reaches them over https with -cloud-ca, all
// from a development CA made in the run's temp dir. cloudHC (status,
// export) trusts it; cloudScheme is the nodes' URL scheme.
var (
	cloudHC     = http.DefaultClient
	cloudScheme = "http://"
)

type result struct {
	BacklogReadings int     `json:"backlog_readings"`
	BacklogBuildS   float64 `json:"backlog_build_s"`
	ConvergeS       float64 `json:"converge_s"`
	ReadingsPerS    float64 `json:"readings_per_s"`
	LiveP50Ms       float64 `json:"live_p50_ms"`
	LiveP99Ms       float64 `json:"live_p99_ms"`
	LiveSamples     int     `json:"live_samples"`
	EdgeRSSMB       float64 `json:"edge_rss_mb"`
	CloudRSSMB      float64 `json:"cloud_rss_mb"`
	// CPU seconds each process used while the backlog drained: where the
	// sync path spends its time.
	EdgeCPUS     float64 `json:"edge_cpu_s"`
	LeaderCPUS   float64 `json:"leader_cpu_s"`
	FollowerCPUS float64 `json:"follower_cpu_s"`
}

func main() {
	var (
		readings = flag.Int("readings", 1_000_000, "backlog size")
		devices  = flag.Int("devices", 100, "devices publishing the backlog")
		per      = flag.Int("per-message", 500, "readings per MQTT message (JSON array)")
		live     = flag.Int("live", 300, "single readings published after convergence for the live-latency sample")
		binDir   = flag.String("bin", "", "directory with prebuilt edge and cloud-sync binaries (default: build into a temp dir)")
		keep     = flag.Bool("keep", false, "keep the data directories")
		tlsOn    = flag.Bool("tls", false, "run with everything on: cluster mutual TLS and edge→cloud https (-cloud-ca), development certificates in the temp dir")
		profile  = flag.String("profile", "", "directory: write CPU profiles of the edge (edge.pprof) and the cloud leader (leader.pprof) covering the drain there")
		profSecs = flag.Int("profile-seconds", 4, "length of the -profile profiles, from the moment the link heals")
	)
	flag.Parse()
	log.SetFlags(log.Ltime | log.Lmicroseconds)
	log.SetOutput(os.Stderr)
	res, err := run(*readings, *devices, *per, *live, *binDir, *keep, *tlsOn, *profile, *profSecs)
	if err != nil {
		log.Fatalf("syncbench: %v", err)
	}
	b, _ := json.Marshal(res)
	fmt.Println(string(b))
}

func run(readings, devices, per, live int, binDir string, keep, tlsOn bool, profDir string, profSecs int) (*result, error) {
	tmp, err := os.MkdirTemp("", "syncbench-")
	if err != nil {
		return nil, err
	}
	if !keep {
		defer os.RemoveAll(tmp)
	}
	if binDir == "" {
		binDir = filepath.Join(tmp, "bin")
		for _, p := range []string{"edge", "cloud-sync"} {
			cmd := exec.Command("go", "build", "-o", filepath.Join(binDir, p), "./cmd/"+p)
			cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
			if err := cmd.Run(); err != nil {
				return nil, fmt.Errorf("build %s: %w", p, err)
			}
		}
	}
	var set *devcerts.Set
	if tlsOn {
		if set, err = devcerts.Write(filepath.Join(tmp, "certs"), devcerts.Options{Names: []string{"n0", "n1", "n2", "server"}}); err != nil {
			return nil, err
		}
		pool, err := certs.LoadPool(set.CA)
		if err != nil {
			return nil, err
		}
		cloudHC = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}}}
		cloudScheme = "https://"
	}
	var procs []*exec.Cmd
	defer func() {
		for _, p := range procs {
			_ = p.Process.Kill()
			_, _ = p.Process.Wait()
		}
	}()

	// The cloud: three nodes.
	var nodes, admins []string
	for i := 0; i < 3; i++ {
		httpAddr, raftAddr := benchproc.FreeAddr(), benchproc.FreeAddr()
		args := []string{"-id", fmt.Sprintf("n%d", i), "-raft", raftAddr, "-http", httpAddr,
			"-data", filepath.Join(tmp, fmt.Sprintf("n%d", i)), "-api-token", apiToken, "-log-level", "warn",
			"-edge-token", edgeID + "=" + edgeToken}
		if i == 0 {
			args = append(args, "-bootstrap")
		} else {
			args = append(args, "-join", cloudScheme+nodes[0])
		}
		if profDir != "" {
			admins = append(admins, benchproc.FreeAddr())
			args = append(args, "-pprof", admins[i])
		}
		if set != nil {
			args = append(args, set.ClusterArgs(fmt.Sprintf("n%d", i))...)
			args = append(args, set.TLSArgs("server")...)
		}
		cmd := exec.Command(filepath.Join(binDir, "cloud-sync"), args...)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			return nil, err
		}
		procs = append(procs, cmd)
		nodes = append(nodes, httpAddr)
		if err := benchproc.WaitHTTPClient(context.Background(), cloudHC, cloudScheme+httpAddr+"/readyz", 20*time.Second); err != nil {
			return nil, fmt.Errorf("cloud node %d: %w", i, err)
		}
	}
	if err := waitMembers(nodes, 3, 20*time.Second); err != nil {
		return nil, err
	}

	// The link, cut while the backlog builds.
	var proxies []*tcpproxy.Proxy
	var urls []string
	for _, n := range nodes {
		p, err := tcpproxy.Listen(n)
		if err != nil {
			return nil, err
		}
		defer p.Close()
		p.Cut(true)
		proxies = append(proxies, p)
		urls = append(urls, cloudScheme+p.Addr())
	}
	edgeHTTP, mqttAddr := benchproc.FreeAddr(), benchproc.FreeAddr()
	edgeArgs := []string{"-id", edgeID, "-data", filepath.Join(tmp, "edge"),
		"-http", edgeHTTP, "-mqtt-listen", mqttAddr, "-cloud", strings.Join(urls, ","), "-cloud-token", edgeToken,
		"-cloud-backoff-max", "500ms", "-log-level", "warn"}
	if set != nil {
		edgeArgs = append(edgeArgs, "-cloud-ca", set.CA)
	}
	edgeAdmin := ""
	if profDir != "" {
		edgeAdmin = benchproc.FreeAddr()
		edgeArgs = append(edgeArgs, "-pprof", edgeAdmin)
	}
	edge := exec.Command(filepath.Join(binDir, "edge"), edgeArgs...)
	edge.Stderr = os.Stderr
	if err := edge.Start(); err != nil {
		return nil, err
	}
	procs = append(procs, edge)
	if err := benchproc.WaitHTTP(context.Background(), "http://"+edgeHTTP+"/readyz", 20*time.Second); err != nil {
		return nil, fmt.Errorf("edge: %w", err)
	}

	res := &result{BacklogReadings: readings}
	t0 := time.Now()
	if err := publishBacklog(mqttAddr, readings, devices, per); err != nil {
		return nil, err
	}
	head, err := waitBacklog(edgeHTTP, readings, 120*time.Second)
	if err != nil {
		return nil, err
	}
	res.BacklogBuildS = round(time.Since(t0).Seconds())
	log.Printf("backlog of %d readings (%d outbox entries) built in %.1fs; healing the link", readings, head, res.BacklogBuildS)

	// Heal and time convergence: the leader's committed sequence for the
	// edge reaching the edge's outbox head means every reading is committed.
	lead, err := leaderIndex(nodes)
	if err != nil {
		return nil, err
	}
	follower := (lead + 1) % len(nodes)
	cpu0 := cpuOf(edge, procs[lead], procs[follower])
	waitProf := func() {}
	if profDir != "" {
		waitProf = profileAll(profDir, profSecs, map[string]string{"edge": edgeAdmin, "leader": admins[lead]})
	}
	t1 := time.Now()
	for _, p := range proxies {
		p.Cut(false)
	}
	var firstAck time.Duration // the first push's commit: the link's reconnect (backoff) is before it
	for {
		acked, ok := ackedSeq(nodes[0])
		if ok && acked > 0 && firstAck == 0 {
			firstAck = time.Since(t1)
		}
		if ok && acked >= head {
			break
		}
		if time.Since(t1) > 300*time.Second {
			return nil, errors.New("backlog not converged within 300s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	res.ConvergeS = round3(time.Since(t1).Seconds())
	cpu1 := cpuOf(edge, procs[lead], procs[follower])
	res.EdgeCPUS, res.LeaderCPUS, res.FollowerCPUS = round(cpu1[0]-cpu0[0]), round(cpu1[1]-cpu0[1]), round(cpu1[2]-cpu0[2])
	waitProf()
	m := metrics("http://" + edgeHTTP + "/metrics")
	for k, v := range m {
		if strings.HasPrefix(k, "outpost_sync_retries_total") && v > 0 {
			log.Printf("edge: %s %v", k, v)
		}
	}
	if n := m["outpost_sync_push_duration_seconds_count"]; n > 0 {
		log.Printf("%v pushes, mean %.1f ms each, %.0f readings per push", n, 1000*m["outpost_sync_push_duration_seconds_sum"]/n, m["outpost_sync_batch_readings_sum"]/n)
	}
	logLeader(nodes[lead])
	res.ReadingsPerS = float64(int64(float64(readings) / res.ConvergeS))
	log.Printf("converged in %.2fs; the first push committed %.2fs after the heal (reconnect backoff and one push)", res.ConvergeS, firstAck.Seconds())

	lat, err := liveLatency(mqttAddr, nodes, live)
	if err != nil {
		return nil, err
	}
	res.LiveSamples = len(lat)
	res.LiveP50Ms, res.LiveP99Ms = round(pct(lat, 50)), round(pct(lat, 99))

	res.EdgeRSSMB = round(benchproc.StatusMB(edge.Process.Pid)["VmHWM"])
	for _, p := range procs[:3] {
		res.CloudRSSMB = max(res.CloudRSSMB, round(benchproc.StatusMB(p.Process.Pid)["VmHWM"]))
	}
	return res, nil
}

// publishBacklog publishes readings as JSON arrays from devices clients.
func publishBacklog(addr string, readings, devices, per int) error {
	perDev := readings / devices
	base := time.Now().Add(-24 * time.Hour).UnixMilli()
	var wg sync.WaitGroup
	errc := make(chan error, devices)
	sem := make(chan struct{}, 8)
	for d := 0; d < devices; d++ {
		wg.Add(1)
		go func(d int) {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			dev := fmt.Sprintf("dev-%03d", d)
			cl, err := connect(addr, dev)
			if err != nil {
				errc <- err
				return
			}
			defer cl.Disconnect(0)
			var toks []paho.Token
			var b bytes.Buffer
			for i := 0; i < perDev; i += per {
				b.Reset()
				b.WriteByte('[')
				for j := i; j < min(i+per, perDev); j++ {
					if j > i {
						b.WriteByte(',')
					}
					fmt.Fprintf(&b, `{"ts":%d,"id":"%s-%d","metrics":{"temp":%d.5,"hum":%d}}`, base+int64(j), dev, j, j%40, j%100)
				}
				b.WriteByte(']')
				toks = append(toks, cl.Publish("sensors/"+dev+"/telemetry", 1, false, append([]byte(nil), b.Bytes()...)))
				if len(toks) >= 8 {
					if err := settle(toks[0]); err != nil {
						errc <- err
						return
					}
					toks = toks[1:]
				}
			}
			for _, t := range toks {
				if err := settle(t); err != nil {
					errc <- err
					return
				}
			}
		}(d)
	}
	wg.Wait()
	select {
	case err := <-errc:
		return err
	default:
		return nil
	}
}

func settle(t paho.Token) error {
	if !t.WaitTimeout(60 * time.Second) {
		return errors.New("publish: no PUBACK within 60s")
	}
	return t.Error()
}

func connect(addr, id string) (paho.Client, error) {
	opts := paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(id).SetCleanSession(true).
		SetAutoReconnect(false).SetWriteTimeout(30 * time.Second).SetMaxResumePubInFlight(64)
	cl := paho.NewClient(opts)
	t := cl.Connect()
	if !t.WaitTimeout(10*time.Second) || t.Error() != nil {
		return nil, fmt.Errorf("mqtt connect %s: %v", id, t.Error())
	}
	return cl, nil
}

// liveLatency publishes n single readings at 50/s after convergence and
// measures, for each, the time from publish until the cloud leader's export
// stream shows it committed.
func liveLatency(addr string, nodes []string, n int) ([]float64, error) {
	lead, err := leaderHTTP(nodes)
	if err != nil {
		return nil, err
	}
	cursor, err := exportTail(lead, "", nil)
	if err != nil {
		return nil, err
	}
	cl, err := connect(addr, "live-dev")
	if err != nil {
		return nil, err
	}
	defer cl.Disconnect(0)
	var mu sync.Mutex
	sentAt := map[string]time.Time{}
	var lat []float64
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var seen atomic.Int64
	done := make(chan error, 1)
	go func() {
		for ctx.Err() == nil && seen.Load() < int64(n) {
			c, err := exportTail(lead, cursor, func(id string) {
				mu.Lock()
				if t, ok := sentAt[id]; ok {
					lat = append(lat, float64(time.Since(t).Microseconds())/1000)
					delete(sentAt, id)
					seen.Add(1)
				}
				mu.Unlock()
			})
			if err != nil {
				done <- err
				return
			}
			cursor = c
			time.Sleep(2 * time.Millisecond)
		}
		done <- nil
	}()
	base := time.Now().UnixMilli()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for i := 0; i < n; i++ {
		<-tick.C
		id := fmt.Sprintf("live-%d", i)
		mu.Lock()
		sentAt[id] = time.Now()
		mu.Unlock()
		cl.Publish("sensors/live-dev/telemetry", 1, false, fmt.Appendf(nil, `{"ts":%d,"id":%q,"metrics":{"v":%d}}`, base+int64(i), id, i))
	}
	select {
	case err := <-done:
		if err != nil {
			return nil, err
		}
	case <-time.After(30 * time.Second):
		cancel()
		return nil, fmt.Errorf("live readings: only %d of %d committed within 30s", seen.Load(), n)
	}
	mu.Lock()
	defer mu.Unlock()
	return append([]float64(nil), lat...), nil
}

// exportTail reads the export stream after cursor, calling fn for each
// reading id, and returns the cursor to resume from.
func exportTail(node, cursor string, fn func(id string)) (string, error) {
	for {
		req, _ := http.NewRequest(http.MethodGet, cloudScheme+node+"/api/v1/export?limit=10000&since="+cursor, nil)
		req.Header.Set("Authorization", "Bearer "+apiToken)
		resp, err := cloudHC.Do(req)
		if err != nil {
			return cursor, err
		}
		raw, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return cursor, fmt.Errorf("export: %d %s", resp.StatusCode, raw)
		}
		lines := 0
		if fn != nil {
			dec := json.NewDecoder(bytes.NewReader(raw))
			for dec.More() {
				var r struct {
					Readings []struct {
						ID string `json:"id"`
					} `json:"readings"`
				}
				if err := dec.Decode(&r); err != nil {
					return cursor, err
				}
				lines++
				for _, rd := range r.Readings {
					fn(rd.ID)
				}
			}
		} else {
			lines = bytes.Count(raw, []byte{'\n'})
		}
		next := resp.Header.Get("X-Outpost-Next-Cursor")
		if lines == 0 || next == cursor || next == "" {
			return cursor, nil
		}
		cursor = next
	}
}

type envelope struct {
	Data json.RawMessage `json:"data"`
}

func getJSON(url, token string, out any) error {
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := cloudHC.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return fmt.Errorf("GET %s: %d", url, resp.StatusCode)
	}
	var env envelope
	if err := json.NewDecoder(resp.Body).Decode(&env); err != nil {
		return err
	}
	return json.Unmarshal(env.Data, out)
}

func ackedSeq(node string) (uint64, bool) {
	var page struct {
		Items []struct {
			ID       string `json:"id"`
			AckedSeq uint64 `json:"acked_seq"`
		} `json:"items"`
	}
	if err := getJSON(cloudScheme+node+"/api/v1/edges?consistency=strong", apiToken, &page); err != nil {
		return 0, false
	}
	for _, e := range page.Items {
		if e.ID == edgeID {
			return e.AckedSeq, true
		}
	}
	return 0, false
}

// waitBacklog waits until the edge stored every reading and returns its
// outbox head (the sequence the cloud must reach).
func waitBacklog(edgeHTTP string, readings int, d time.Duration) (uint64, error) {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		vals := metrics("http://" + edgeHTTP + "/metrics")
		if vals["outpost_store_readings"] >= float64(readings) {
			return uint64(vals["outpost_sync_backlog"]), nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return 0, fmt.Errorf("edge did not store %d readings within %s", readings, d)
}

// logLeader logs where the leader's time per push went: the whole request,
// and proposal to applied result in raft.
func logLeader(node string) {
	m := metricsAuth(cloudHC, cloudScheme+node+"/metrics", apiToken)
	var reqSum, reqN float64
	for k, v := range m {
		if strings.HasPrefix(k, "outpost_http_request_duration_seconds_") && strings.Contains(k, "push") {
			switch {
			case strings.HasPrefix(k, "outpost_http_request_duration_seconds_sum"):
				reqSum += v
			case strings.HasPrefix(k, "outpost_http_request_duration_seconds_count"):
				reqN += v
			}
		}
	}
	if reqN > 0 {
		log.Printf("leader: %v push requests, mean %.1f ms; raft proposal to result mean %.1f ms over %v proposals, %.1f commands per entry",
			reqN, 1000*reqSum/reqN, 1000*m["outpost_raft_apply_duration_seconds_sum"]/m["outpost_raft_apply_duration_seconds_count"],
			m["outpost_raft_apply_duration_seconds_count"], m["outpost_raft_entry_commands_sum"]/m["outpost_raft_entry_commands_count"])
	}
}

func metrics(url string) map[string]float64 { return metricsAuth(http.DefaultClient, url, "") }

func metricsAuth(hc *http.Client, url, token string) map[string]float64 {
	out := map[string]float64{}
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return out
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 2 && !strings.HasPrefix(f[0], "#") {
			if v, err := strconv.ParseFloat(f[1], 64); err == nil {
				out[f[0]] = v
			}
		}
	}
	return out
}

// cpuOf is the CPU seconds each of procs has used so far.
func cpuOf(procs ...*exec.Cmd) []float64 {
	out := make([]float64, len(procs))
	for i, p := range procs {
		out[i], _ = benchproc.CPUSeconds(p.Process.Pid)
	}
	return out
}

// profileAll starts a CPU profile of secs seconds of each named admin
// address, written to dir/<name>.pprof; the returned func waits for them.
func profileAll(dir string, secs int, admins map[string]string) func() {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		log.Printf("profile: %v", err)
		return func() {}
	}
	var wg sync.WaitGroup
	for name, addr := range admins {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := http.Get(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", addr, secs))
			if err != nil {
				log.Printf("profile %s: %v", name, err)
				return
			}
			defer resp.Body.Close()
			f, err := os.Create(filepath.Join(dir, name+".pprof"))
			if err != nil {
				log.Printf("profile %s: %v", name, err)
				return
			}
			defer f.Close()
			_, _ = io.Copy(f, resp.Body)
		}()
	}
	return wg.Wait
}

// leaderIndex is the index in nodes of the raft leader.
func leaderIndex(nodes []string) (int, error) {
	lead, err := leaderHTTP(nodes)
	if err != nil {
		return 0, err
	}
	for i, n := range nodes {
		if n == lead {
			return i, nil
		}
	}
	return 0, fmt.Errorf("leader %s is none of the nodes", lead)
}

func leaderHTTP(nodes []string) (string, error) {
	var st struct {
		Leader string `json:"leader"`
		Nodes  []struct {
			ID       string `json:"id"`
			HTTPAddr string `json:"http_addr"`
		} `json:"nodes"`
	}
	if err := getJSON(cloudScheme+nodes[0]+"/cluster/v1/status", apiToken, &st); err != nil {
		return "", err
	}
	for _, n := range st.Nodes {
		if n.ID == st.Leader && n.HTTPAddr != "" {
			return n.HTTPAddr, nil
		}
	}
	return nodes[0], nil
}

func waitMembers(nodes []string, n int, d time.Duration) error {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		var st struct {
			Leader string            `json:"leader"`
			Nodes  []json.RawMessage `json:"nodes"`
		}
		if err := getJSON(cloudScheme+nodes[0]+"/cluster/v1/status", apiToken, &st); err == nil && st.Leader != "" && len(st.Nodes) == n {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("cluster of %d did not form within %s", n, d)
}

func pct(v []float64, p float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	i := int(float64(len(s)-1) * p / 100)
	return s[i]
}

func round(f float64) float64  { return float64(int64(f*10)) / 10 }
func round3(f float64) float64 { return float64(int64(f*1000)) / 1000 }
