// Command edgebench measures the edge's durable MQTT ingest against a bare
// broker in the same run: 100 simulated devices publish QoS 1 to each, in
// rounds that alternate between the two (so that load from elsewhere on the
// machine weighs on both alike), and it prints one JSON line with
// throughput, the ratio to the baseline, the CPU each broker process spent
// per message, publish-to-ack latency, loss and duplicates (checked through
// the API), and the edge's peak RSS. It also measures batched payloads, a
// 1000-reading page and stats over 1M readings.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/auth"
	"github.com/mochi-mqtt/server/v2/listeners"

	"github.com/outpost-edge/outpost/internal/benchproc"
	"github.com/outpost-edge/outpost/internal/rawmqtt"
)

type options struct {
	edgeBin  string
	devices  int
	window   int
	duration time.Duration
	rounds   int
	batched  time.Duration
	bigN     int
	verbose  bool
	pprof    string
	rules    int
}

func main() {
	if len(os.Args) > 2 && os.Args[1] == "bare-broker" {
		os.Exit(bareBroker(os.Args[2]))
	}
	var o options
	flag.StringVar(&o.edgeBin, "edge", "", "edge binary (default: build ./cmd/edge)")
	flag.IntVar(&o.devices, "devices", 100, "simulated devices (one MQTT connection each)")
	flag.IntVar(&o.window, "window", 4, "QoS 1 publishes in flight per device")
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "duration of the single-reading load on each broker, over all rounds")
	flag.IntVar(&o.rounds, "rounds", 4, "alternations of the single-reading load between the bare broker and the edge")
	flag.DurationVar(&o.batched, "batched", 5*time.Second, "duration of the batched (100 readings per message) run; 0 skips")
	flag.IntVar(&o.bigN, "big", 1_000_000, "readings of one device for the stats benchmark; 0 skips")
	flag.BoolVar(&o.verbose, "v", false, "log progress to stderr")
	flag.StringVar(&o.pprof, "edge-pprof", "", "pass -pprof ADDR to the edge, to profile it during the run")
	flag.IntVar(&o.rules, "rules", 100, "rules (one per device) in force on the edge in a third side of each round; 0 skips")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	if o.verbose {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	res, err := run(ctx, o, log)
	if err != nil {
		fmt.Fprintf(os.Stderr, "edgebench: %v\n", err)
		os.Exit(1)
	}
	out, _ := json.Marshal(res)
	fmt.Println(string(out))
}

type result struct {
	MsgsPerS         float64 `json:"msgs_per_s"`
	BaselineMsgsPerS float64 `json:"baseline_msgs_per_s"`
	Ratio            float64 `json:"ratio"`
	P50ms            float64 `json:"p50_ms"`
	P99ms            float64 `json:"p99_ms"`
	Lost             int     `json:"lost"`
	Dupes            int     `json:"dupes"`
	RSSMB            float64 `json:"rss_mb"`
	RSSAnonMB        float64 `json:"rss_anon_mb"`
	RSSFileMB        float64 `json:"rss_file_mb"`
	BaselineP99ms    float64 `json:"baseline_p99_ms"`
	// CPU of the broker process per acknowledged message, in µs: less
	// sensitive to other load on the machine than the rates.
	CPUusPerMsg         float64   `json:"cpu_us_per_msg"`
	BaselineCPUusPerMsg float64   `json:"baseline_cpu_us_per_msg"`
	RoundRatios         []float64 `json:"round_ratios,omitempty"`
	// The edge with o.rules rules in force, in the same rounds: its rate
	// and ratio to the bare broker, its CPU per message, the rule engine's
	// share of it per reading, and the delay from a reading's commit to the
	// alert it caused (from the edge's histogram).
	RulesMsgsPerS       float64   `json:"rules_msgs_per_s,omitempty"`
	RulesRatio          float64   `json:"rules_ratio,omitempty"`
	RulesCPUusPerMsg    float64   `json:"rules_cpu_us_per_msg,omitempty"`
	RuleCPUusPerReading float64   `json:"rule_cpu_us_per_reading,omitempty"`
	RulesRoundRatios    []float64 `json:"rules_round_ratios,omitempty"`
	Alerts              int       `json:"alert_transitions,omitempty"`
	AlertP50ms          float64   `json:"alert_delay_p50_ms,omitempty"`
	AlertP99ms          float64   `json:"alert_delay_p99_ms,omitempty"`
	BatchedReadingsS    float64   `json:"batched_readings_per_s,omitempty"`
	BatchedP99ms        float64   `json:"batched_p99_ms,omitempty"`
	Page1000ms          float64   `json:"page_1000_ms,omitempty"`
	Stats1Mms           float64   `json:"stats_1m_ms,omitempty"`
	StatsReadings       int       `json:"stats_readings,omitempty"`
}

func run(ctx context.Context, o options, log *slog.Logger) (result, error) {
	var res result
	tmp, err := os.MkdirTemp("", "edgebench")
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(tmp)
	if o.edgeBin == "" {
		o.edgeBin = filepath.Join(tmp, "edge")
		log.Info("building edge")
		cmd := exec.Command("go", "build", "-o", o.edgeBin, "./cmd/edge")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return res, fmt.Errorf("build edge: %w", err)
		}
	}
	self, err := os.Executable()
	if err != nil {
		return res, err
	}

	// Baseline: a bare mochi broker in its own process, a subscriber that
	// only acknowledges, and the same publishers.
	bareAddr := benchproc.FreeAddr()
	bare := exec.CommandContext(ctx, self, "bare-broker", bareAddr)
	bare.Stderr = os.Stderr
	if err := bare.Start(); err != nil {
		return res, err
	}
	defer func() { bare.Process.Kill(); bare.Wait() }()
	if err := waitTCP(ctx, bareAddr); err != nil {
		return res, err
	}
	var subGot atomic.Int64
	sub, err := ackingSubscriber(bareAddr, &subGot)
	if err != nil {
		return res, err
	}

	// The edge under test, as a real process with its own data directory.
	httpAddr, mqttAddr := benchproc.FreeAddr(), benchproc.FreeAddr()
	dataDir := filepath.Join(tmp, "data")
	cfgPath := filepath.Join(tmp, "edge.yaml")
	// The verification reads every reading back; rate limits would get in the way.
	if err := os.WriteFile(cfgPath, []byte("api:\n  rate_limit_per_ip: 0\n  rate_limit_per_user: 0\n"), 0o600); err != nil {
		return res, err
	}
	edge := exec.CommandContext(ctx, o.edgeBin, "-config", cfgPath, "-id", "bench", "-data", dataDir, "-http", httpAddr,
		"-mqtt-listen", mqttAddr, "-dev-login", "-admin", "bench", "-log-level", "warn",
		"-policies", filepath.Join(mustGetwd(), "policies"))
	if o.pprof != "" {
		edge.Args = append(edge.Args, "-pprof", o.pprof)
	}
	edge.Stderr = os.Stderr
	if err := edge.Start(); err != nil {
		return res, err
	}
	defer func() { edge.Process.Signal(syscall.SIGTERM); edge.Wait() }()
	if err := benchproc.WaitHTTP(ctx, "http://"+httpAddr+"/readyz", 20*time.Second); err != nil {
		return res, err
	}
	mem := newMemSampler(edge.Process.Pid)
	defer mem.stop()

	api := &apiClient{base: "http://" + httpAddr}
	if err := api.login(); err != nil {
		return res, err
	}

	// Rounds alternate the sides (base, edge, rules; then the reverse) so
	// that drift in the machine's other load cancels out; each side's
	// figures are over all its rounds. The rules side is the same edge with
	// o.rules rules put in force before it and deleted after it.
	rounds := max(o.rounds, 1)
	ro := o
	ro.duration = o.duration / time.Duration(rounds)
	sides := []string{"base", "edge"}
	if o.rules > 0 {
		sides = append(sides, "rules")
	}
	var base, er, rr loadResult
	var baseCPU, edgeCPU, rulesCPU float64
	for r := 0; r < rounds; r++ {
		var b, e, w loadResult
		order := append([]string(nil), sides...)
		if r%2 == 1 {
			slices.Reverse(order)
		}
		for _, side := range order {
			log.Info("single-reading run", "round", r, "broker", side)
			addr, prefix, pid := bareAddr, "base", bare.Process.Pid
			if side != "base" {
				addr, prefix, pid = mqttAddr, "dev", edge.Process.Pid
			}
			if side == "rules" {
				if err := api.putRules(o.rules, "dev"); err != nil {
					return res, err
				}
			}
			cpu0, _ := benchproc.CPUSeconds(pid)
			lr, err := publishLoad(ctx, addr, prefix, side+strconv.Itoa(r), ro, 1)
			if err != nil {
				return res, fmt.Errorf("%s round %d: %w", side, r, err)
			}
			if side != "base" {
				// Work the load left behind (the rule engine runs after
				// the ack) belongs to this side.
				if err := api.waitRulesIdle(ctx, 30*time.Second); err != nil {
					return res, err
				}
			}
			cpu1, _ := benchproc.CPUSeconds(pid)
			switch side {
			case "edge":
				e, edgeCPU = lr, edgeCPU+cpu1-cpu0
			case "rules":
				w, rulesCPU = lr, rulesCPU+cpu1-cpu0
				if err := api.deleteRules(o.rules); err != nil {
					return res, err
				}
			default:
				b, baseCPU = lr, baseCPU+cpu1-cpu0
			}
		}
		if b.rate > 0 {
			res.RoundRatios = append(res.RoundRatios, round(e.rate/b.rate, 3))
			if o.rules > 0 {
				res.RulesRoundRatios = append(res.RulesRoundRatios, round(w.rate/b.rate, 3))
			}
		}
		base.merge(b)
		er.merge(e)
		rr.merge(w)
	}
	base.finish()
	er.finish()
	rr.finish()
	if o.rules > 0 && rr.messages > 0 && base.rate > 0 {
		res.RulesMsgsPerS, res.RulesRatio = rr.rate, round(rr.rate/base.rate, 3)
		res.RulesCPUusPerMsg = round(rulesCPU*1e6/float64(rr.messages), 2)
		if er.messages > 0 {
			res.RuleCPUusPerReading = round(res.RulesCPUusPerMsg-edgeCPU*1e6/float64(er.messages), 2)
		}
		if res.Alerts, res.AlertP50ms, res.AlertP99ms, err = api.alertDelay(); err != nil {
			return res, err
		}
	}
	res.BaselineMsgsPerS = base.rate
	res.BaselineP99ms = base.p99
	res.MsgsPerS, res.P50ms, res.P99ms = er.rate, er.p50, er.p99
	res.Ratio = round(er.rate/base.rate, 3)
	if base.messages > 0 && er.messages > 0 {
		res.BaselineCPUusPerMsg = round(baseCPU*1e6/float64(base.messages), 2)
		res.CPUusPerMsg = round(edgeCPU*1e6/float64(er.messages), 2)
	}
	sub.Disconnect(100)
	bare.Process.Kill()

	log.Info("checking loss and duplicates")
	all := loadResult{}
	all.merge(er)
	all.merge(rr) // the rules side's readings are the edge's too
	res.Lost, res.Dupes, err = verify(api, all)
	if err != nil {
		return res, err
	}

	if o.batched > 0 {
		bo := o
		bo.duration = o.batched
		bo.window = 4
		br, err := publishLoad(ctx, mqttAddr, "batch", "", bo, 100)
		if err != nil {
			return res, fmt.Errorf("batched: %w", err)
		}
		res.BatchedReadingsS, res.BatchedP99ms = round(br.rate*100, 0), br.p99
	}

	log.Info("single-reading load", "edge", er.rate, "baseline", base.rate, "p99", er.p99, "lost", res.Lost, "dupes", res.Dupes)
	if o.bigN > 0 {
		log.Info("loading one device", "readings", o.bigN)
		if err := loadOneDevice(ctx, mqttAddr, "big-0", o.bigN); err != nil {
			return res, err
		}
		res.StatsReadings = o.bigN
		if res.Stats1Mms, err = api.timeStats("big-0", o.bigN); err != nil {
			return res, err
		}
		if res.Page1000ms, err = api.timePage("big-0", 1000); err != nil {
			return res, err
		}
	}
	res.RSSMB = round(benchproc.StatusMB(edge.Process.Pid)["VmHWM"], 1)
	res.RSSAnonMB, res.RSSFileMB = mem.stop()
	if o.verbose {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", edge.Process.Pid))
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "Rss") || strings.HasPrefix(l, "VmHWM") {
				log.Info("edge memory", "line", l)
			}
		}
	}
	return res, nil
}

// ---- load ----

type loadResult struct {
	rate     float64
	p50, p99 float64
	acked    map[string][]string // device -> acked message ids
	messages int
	elapsed  time.Duration
	lat      []time.Duration
}

// merge adds the messages of another run to r; finish computes the figures
// over all of them.
func (r *loadResult) merge(o loadResult) {
	if r.acked == nil {
		r.acked = map[string][]string{}
	}
	for dev, ids := range o.acked {
		r.acked[dev] = append(r.acked[dev], ids...)
	}
	r.messages += o.messages
	r.elapsed += o.elapsed
	r.lat = append(r.lat, o.lat...)
}

func (r *loadResult) finish() {
	if r.elapsed > 0 {
		r.rate = round(float64(r.messages)/r.elapsed.Seconds(), 0)
	}
	lat := r.lat
	sort.Slice(lat, func(a, b int) bool { return lat[a] < lat[b] })
	if len(lat) > 0 {
		r.p50 = ms(lat[len(lat)/2])
		r.p99 = ms(lat[len(lat)*99/100])
	}
}

// publishLoad runs o.devices publishers, each with up to o.window QoS 1
// messages in flight, for o.duration, and reports acknowledged messages per
// second and publish-to-ack latency. run tells message ids of repeated
// runs on the same devices apart.
func publishLoad(ctx context.Context, addr, prefix, run string, o options, perMsg int) (loadResult, error) {
	res := loadResult{acked: map[string][]string{}}
	type pubState struct {
		pub   *rawmqtt.Publisher[string]
		acked []string
		lat   []time.Duration
	}
	states := make([]*pubState, o.devices)
	for i := range states {
		st := &pubState{}
		pub, err := rawmqtt.Dial(addr, rawmqtt.Options[string]{ClientID: fmt.Sprintf("%s-pub-%d", prefix, i), Window: o.window, OnAck: func(id string, d time.Duration) {
			st.acked = append(st.acked, id)
			st.lat = append(st.lat, d)
		}})
		if err != nil {
			return res, fmt.Errorf("connect publisher %d: %w", i, err)
		}
		st.pub = pub
		states[i] = st
	}
	deadline := time.Now().Add(o.duration)
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, len(states))
	for i, st := range states {
		wg.Add(1)
		go func() {
			defer wg.Done()
			topic := "sensors/" + fmt.Sprintf("%s-%d", prefix, i) + "/telemetry"
			ts := time.Now().UnixMilli() - 3_600_000
			for n := 0; time.Now().Before(deadline) && ctx.Err() == nil; n++ {
				id := prefix + strconv.Itoa(i) + "-" + run + "-" + strconv.Itoa(n)
				if err := st.pub.Publish(topic, id, message(id, ts, n, perMsg)); err != nil {
					errs <- err
					return
				}
				ts += int64(perMsg)
			}
			if err := st.pub.Drain(30 * time.Second); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	if err := <-errs; err != nil {
		return res, err
	}
	var lat []time.Duration
	for i, st := range states {
		st.pub.Close()
		lat = append(lat, st.lat...)
		res.acked[fmt.Sprintf("%s-%d", prefix, i)] = st.acked
	}
	res.messages, res.elapsed, res.lat = len(lat), elapsed, lat
	res.finish()
	return res, nil
}

// message is one telemetry payload; with perMsg > 1 an array of readings
// whose ids derive from id.
func message(id string, ts int64, n, perMsg int) []byte {
	if perMsg == 1 {
		return []byte(`{"ts":` + strconv.FormatInt(ts, 10) + `,"id":"` + id + `","metrics":{"temp":` +
			strconv.Itoa(20+n%10) + `.5,"hum":` + strconv.Itoa(40+n%7) + `}}`)
	}
	var b strings.Builder
	b.WriteByte('[')
	for k := 0; k < perMsg; k++ {
		if k > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"ts":%d,"id":"%s.%d","metrics":{"temp":%d.5,"hum":%d}}`, ts+int64(k), id, k, 20+k%10, 40+k%7)
	}
	b.WriteByte(']')
	return []byte(b.String())
}

func ackingSubscriber(addr string, got *atomic.Int64) (paho.Client, error) {
	c := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID("bench-sub").
		SetCleanSession(true).SetOrderMatters(false))
	if t := c.Connect(); !t.WaitTimeout(10*time.Second) || t.Error() != nil {
		return nil, fmt.Errorf("connect subscriber: %v", t.Error())
	}
	t := c.Subscribe("sensors/#", 1, func(_ paho.Client, m paho.Message) { got.Add(1) })
	if !t.WaitTimeout(10*time.Second) || t.Error() != nil {
		return nil, fmt.Errorf("subscribe: %v", t.Error())
	}
	return c, nil
}

// loadOneDevice publishes n readings for one device in arrays of 1000.
func loadOneDevice(ctx context.Context, addr, dev string, n int) error {
	c := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID("bench-big").SetAutoReconnect(false))
	if t := c.Connect(); !t.WaitTimeout(10*time.Second) || t.Error() != nil {
		return fmt.Errorf("connect: %v", t.Error())
	}
	defer c.Disconnect(50)
	// One reading per second ending now: about 11.5 days for 1M.
	ts := time.Now().UnixMilli() - int64(n)*1000
	sem := make(chan paho.Token, 8)
	for sent := 0; sent < n && ctx.Err() == nil; {
		k := min(1000, n-sent)
		var b strings.Builder
		b.WriteByte('[')
		for j := 0; j < k; j++ {
			if j > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `{"ts":%d,"metrics":{"temp":%d.25}}`, ts, (sent+j)%40)
			ts += 1000
		}
		b.WriteByte(']')
		if len(sem) == cap(sem) {
			t := <-sem
			if !t.WaitTimeout(30*time.Second) || t.Error() != nil {
				return fmt.Errorf("publish: %v", t.Error())
			}
		}
		sem <- c.Publish("sensors/"+dev+"/telemetry", 1, false, b.String())
		sent += k
	}
	for len(sem) > 0 {
		t := <-sem
		if !t.WaitTimeout(30*time.Second) || t.Error() != nil {
			return fmt.Errorf("publish: %v", t.Error())
		}
	}
	return ctx.Err()
}

// ---- verification and queries through the API ----

type apiClient struct {
	base  string
	token string
	hc    http.Client
}

func (a *apiClient) login() error {
	resp, err := a.hc.Post(a.base+"/api/v1/auth/login", "application/json", strings.NewReader(`{"code":"dev:bench"}`))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	var env struct {
		Data struct {
			AccessToken string `json:"access_token"`
		} `json:"data"`
		Message string `json:"message"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&env); err != nil || env.Data.AccessToken == "" {
		return fmt.Errorf("login: %v %s", err, env.Message)
	}
	a.token = env.Data.AccessToken
	return nil
}

func (a *apiClient) get(path string, into any) error {
	req, _ := http.NewRequest(http.MethodGet, a.base+path, nil)
	req.Header.Set("Authorization", "Bearer "+a.token)
	resp, err := a.hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %s", path, resp.Status, b)
	}
	if into != nil {
		return json.Unmarshal(b, into)
	}
	return nil
}

type readingsPage struct {
	Data struct {
		Items []struct {
			ID string `json:"id"`
		} `json:"items"`
		NextCursor string `json:"next_cursor"`
	} `json:"data"`
}

// verify reads every device's readings and compares them with the acked ids.
func verify(a *apiClient, lr loadResult) (lost, dupes int, err error) {
	for dev, ids := range lr.acked {
		seen := map[string]int{}
		cursor := ""
		for {
			var p readingsPage
			if err := a.get("/api/v1/devices/"+dev+"/readings?limit=1000&cursor="+cursor, &p); err != nil {
				return 0, 0, err
			}
			for _, it := range p.Data.Items {
				seen[it.ID]++
			}
			if p.Data.NextCursor == "" {
				break
			}
			cursor = p.Data.NextCursor
		}
		for _, id := range ids {
			if seen[id] == 0 {
				lost++
			}
		}
		for _, n := range seen {
			if n > 1 {
				dupes += n - 1
			}
		}
	}
	return lost, dupes, nil
}

func (a *apiClient) timePage(dev string, limit int) (float64, error) {
	var ds []time.Duration
	for i := 0; i < 51; i++ {
		t0 := time.Now()
		var p readingsPage
		if err := a.get(fmt.Sprintf("/api/v1/devices/%s/readings?limit=%d", dev, limit), &p); err != nil {
			return 0, err
		}
		ds = append(ds, time.Since(t0))
		if len(p.Data.Items) != limit {
			return 0, fmt.Errorf("page has %d readings, want %d", len(p.Data.Items), limit)
		}
	}
	return median(ds), nil
}

func (a *apiClient) timeStats(dev string, n int) (float64, error) {
	to := time.Now().UnixMilli()
	from := to - int64(n)*1000 - 600_000 // slack: the load finished a while ago
	var ds []time.Duration
	for i := 0; i < 21; i++ {
		var p struct {
			Data struct {
				Buckets []struct {
					Count int `json:"count"`
				} `json:"buckets"`
			} `json:"data"`
		}
		t0 := time.Now()
		if err := a.get(fmt.Sprintf("/api/v1/devices/%s/stats?metric=temp&from=%d&to=%d", dev, from, to), &p); err != nil {
			return 0, err
		}
		ds = append(ds, time.Since(t0))
		total := 0
		for _, b := range p.Data.Buckets {
			total += b.Count
		}
		if total != n {
			return 0, fmt.Errorf("stats counted %d readings, want %d", total, n)
		}
	}
	return median(ds), nil
}

// ---- bare broker ----

func bareBroker(addr string) int {
	srv := mqtt.New(&mqtt.Options{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	_ = srv.AddHook(new(auth.AllowHook), nil)
	if err := srv.AddListener(listeners.NewTCP(listeners.Config{ID: "t", Address: addr})); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := srv.Serve(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	srv.Close()
	return 0
}

// ---- helpers ----

func waitTCP(ctx context.Context, addr string) error {
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("%s not listening", addr)
}

func mustGetwd() string {
	wd, err := os.Getwd()
	if err != nil {
		panic(err)
	}
	return wd
}

func median(ds []time.Duration) float64 {
	sort.Slice(ds, func(a, b int) bool { return ds[a] < ds[b] })
	return ms(ds[len(ds)/2])
}

func ms(d time.Duration) float64 { return round(float64(d.Microseconds())/1000, 3) }

func round(v float64, places int) float64 {
	p := 1.0
	for i := 0; i < places; i++ {
		p *= 10
	}
	return float64(int64(v*p+0.5)) / p
}

// memSampler polls a process's resident memory split into anonymous (heap,
// stacks) and file-backed (bbolt's mmap of the database, reclaimable page
// cache) and keeps the peaks, which /proc's VmHWM does not split.
type memSampler struct {
	done       chan struct{}
	wg         sync.WaitGroup
	once       sync.Once
	anon, file float64
}

func newMemSampler(pid int) *memSampler {
	m := &memSampler{done: make(chan struct{})}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			st := benchproc.StatusMB(pid)
			m.anon, m.file = max(m.anon, st["RssAnon"]), max(m.file, st["RssFile"])
			select {
			case <-m.done:
				return
			case <-t.C:
			}
		}
	}()
	return m
}

// stop ends sampling and returns the peaks in MiB.
func (m *memSampler) stop() (anon, file float64) {
	m.once.Do(func() { close(m.done); m.wg.Wait() })
	return round(m.anon, 1), round(m.file, 1)
}

// ---- rules ----

// putRules puts n rules, rule i selecting device prefix-i: it fires when
// temp passes 29 with hum over 45 (the load's temp cycles through 10
// values and hum through 7: one message in 70) and clears under 21, so
// each device raises and clears an alert about every 70 messages.
func (a *apiClient) putRules(n int, prefix string) error {
	for i := range n {
		body := fmt.Sprintf(`{"when":"temp > 29 && hum > 45","clear":"temp < 21","devices":{"ids":["%s-%d"]}}`, prefix, i)
		if err := a.do(http.MethodPut, fmt.Sprintf("/api/v1/rules/bench-%d", i), body); err != nil {
			return err
		}
	}
	return nil
}

func (a *apiClient) deleteRules(n int) error {
	for i := range n {
		if err := a.do(http.MethodDelete, fmt.Sprintf("/api/v1/rules/bench-%d", i), ""); err != nil {
			return err
		}
	}
	return nil
}

func (a *apiClient) do(method, path, body string) error {
	req, _ := http.NewRequest(method, a.base+path, strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+a.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := a.hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, b)
	}
	return nil
}

// waitRulesIdle waits until the rule runner has evaluated everything
// committed.
func (a *apiClient) waitRulesIdle(ctx context.Context, d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		m, err := benchproc.Scrape(&a.hc, a.base+"/metrics")
		if err != nil {
			return err
		}
		if v, ok := m.Value("outpost_rules_lag_changes"); ok && v == 0 {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("rule runner still behind after %v", d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// alertDelay reads the commit-to-alert histogram: how many transitions,
// and the bucket bounds the median and the 99th percentile fall in.
func (a *apiClient) alertDelay() (n int, p50, p99 float64, err error) {
	m, err := benchproc.Scrape(&a.hc, a.base+"/metrics")
	if err != nil {
		return 0, 0, 0, err
	}
	total, _ := m.Value("outpost_rules_alert_delay_duration_seconds_count")
	if total == 0 {
		return 0, 0, 0, nil
	}
	var bounds []float64
	for b := 0.0005; len(bounds) < 16; b *= 2 {
		bounds = append(bounds, b)
	}
	quantile := func(q float64) float64 {
		for _, b := range bounds {
			if v, _ := m.Value(fmt.Sprintf(`outpost_rules_alert_delay_duration_seconds_bucket{le="%s"}`, strconv.FormatFloat(b, 'g', -1, 64))); v >= q*total {
				return round(b*1000, 2)
			}
		}
		return math.Inf(1)
	}
	return int(total), quantile(0.5), quantile(0.99), nil
}
