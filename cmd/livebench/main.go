// Command livebench measures the live feed: an edge (in this process, as
// cmd/edge builds it: store, writer, embedded broker, API) ingests from
// -devices MQTT devices publishing QoS 1 as fast as it acknowledges, in
// -rounds rounds of a run without phones and then one with -phones
// MQTT-over-WebSocket sessions at /mqtt, each subscribed to one device's
// telemetry (the phones connect between the two runs and leave after). It
// prints one JSON line:
//
//	{"ingest_rps":…, "ingest_rps_with_phones":…, "ratio":…, "round_ratios":[…], "phone_p50_ms":…, "phone_p99_ms":…, "rss_kb_per_phone":…, …}
//
// ratio is of the rounds' totals: the machine's speed (its fsync latency
// above all) drifts from minute to minute by more than the phones cost, and
// pairing each run with phones with one just before it keeps most of that
// drift out. rss_kb_per_phone is the edge process's RSS growth per phone
// (after a collection) in the round where it grew most.
//
// The devices and phones run in a child process (livebench -load), as they
// are another machine's in production: the edge's memory is its own, and
// its goroutines are scheduled among themselves alone. Devices are
// internal/rawmqtt publishers (one writer and one reader each), phones are
// minimal MQTT 3.1.1 clients over WebSocket (phone.go: one goroutine and
// 2 KiB of read buffers each). Both still share the machine's two cores
// with the edge. Phones get each topic at most once per the edge's
// mqtt.live_interval (-live-interval), so phone_deliveries is at most
// phones × rounds × duration / interval. -cpuprofile profiles the edge's
// process over the first round's runs (.without and .with), -memprofile
// takes its heap after the last.
//
// Where the latency goes (stages.go): phone_stages splits each delivery
// into the device's wait for room in its window (a reading's timestamp is
// taken before it), its write to its PUBACK (the durable commit is in
// it), and the PUBACK to the phone's read (the live feed's hold, the
// fan-out, the phone's write and read), with the stages' mean over the
// slowest 1 %; publish_to_ack is every reading's, in the runs without and
// with phones; edge_* are the edge's histograms over those runs (commit,
// ack, and a live message from its commit to the mirror and to the phone's
// WebSocket), as bucket bounds. Latency is from the reading's making to the
// phone's read, both in the load process.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/outpost-edge/outpost/internal/benchproc"
	"github.com/outpost-edge/outpost/internal/rawmqtt"
	"github.com/outpost-edge/outpost/pkg/edge"
)

type options struct {
	devices, phones, inflight, rounds int
	duration, liveInterval            time.Duration
	cpuProfile, memProfile, trace     string
	// The load process's: the edge's addresses, an admin token and its
	// process (set by the edge's process when it starts this one).
	load                    bool
	mqttAddr, httpAddr, tok string
	edgePid                 int
}

func main() {
	var o options
	flag.IntVar(&o.devices, "devices", 100, "publishing devices")
	flag.IntVar(&o.phones, "phones", 1000, "phone WebSocket sessions, each subscribed to one device")
	flag.IntVar(&o.inflight, "inflight", 8, "QoS 1 publishes each device keeps in flight")
	flag.IntVar(&o.rounds, "rounds", 3, "rounds of a run without phones and then one with them (the phones connect between the two and leave after)")
	flag.DurationVar(&o.duration, "duration", 5*time.Second, "measured duration of each run")
	flag.DurationVar(&o.liveInterval, "live-interval", 0, "the edge's mqtt.live_interval (0: its default)")
	flag.StringVar(&o.cpuProfile, "cpuprofile", "", "write CPU profiles of the first round's runs to this file name plus .without and .with")
	flag.StringVar(&o.trace, "trace", "", "write execution traces of the edge's process over the first round's runs to this file name plus .without and .with")
	flag.StringVar(&o.memProfile, "memprofile", "", "write a heap profile (allocations of the whole process, live heap after the run with phones) to this file")
	flag.BoolVar(&o.load, "load", false, "internal: be the load process (devices and phones) of an edge's process")
	flag.StringVar(&o.mqttAddr, "load-mqtt", "", "internal: the edge's MQTT address")
	flag.StringVar(&o.httpAddr, "load-http", "", "internal: the edge's HTTP address")
	flag.StringVar(&o.tok, "load-token", "", "internal: an admin token of the edge")
	flag.IntVar(&o.edgePid, "load-edge-pid", 0, "internal: the edge's process")
	flag.Parse()
	run := runEdge
	if o.load {
		run = runLoad
	}
	if err := run(o); err != nil {
		fmt.Fprintf(os.Stderr, "livebench: %v\n", err)
		os.Exit(1)
	}
}

// runEdge runs the edge and, as a child process, the load (runLoad) until
// the load has printed its result: the devices and phones are another
// process's, as they are in production, so that the edge's memory is its
// own and its goroutines are scheduled among its own alone (in one
// process, 1,000 phones' and 100 devices' goroutines kept the run queues
// full and the edge's network reads waited for the runtime's 10 ms
// poll). They still share the machine's cores. The load asks the edge's
// process, over a pipe, to collect garbage before it reads the edge's
// RSS and to profile.
func runEdge(o options) error {
	dir, err := os.MkdirTemp("", "livebench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	cfg := edge.DefaultConfig()
	cfg.ID, cfg.DataDir, cfg.HTTP, cfg.MQTT.Listen = "bench", dir, "127.0.0.1:0", "127.0.0.1:0"
	cfg.Policy.Dir = "policies"
	cfg.DevLogin, cfg.Admins = true, []string{"root"}
	cfg.API.RateLimitPerIP, cfg.API.MaxConns, cfg.API.MaxConnsPerIP = 0, o.phones+1000, o.phones+1000
	cfg.MQTT.MaxConnections = o.devices + 100
	if o.liveInterval > 0 {
		cfg.MQTT.LiveInterval = o.liveInterval
	}
	lv := new(slog.LevelVar)
	lv.Set(slog.LevelError)
	log := slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: lv}))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e, err := edge.Start(ctx, cfg, log, lv)
	if err != nil {
		return err
	}
	defer e.Shutdown(30 * time.Second)
	go func() { _ = e.Run(ctx) }()
	if err := benchproc.WaitHTTP(ctx, "http://"+e.HTTPAddr()+"/healthz", 10*time.Second); err != nil {
		return err
	}
	token, err := login(e.HTTPAddr(), "root")
	if err != nil {
		return err
	}
	o.liveInterval = cfg.MQTT.LiveInterval
	return runChild(o, e.MQTTAddr(), e.HTTPAddr(), token)
}

// runLoad is the load process: the devices, the phones and the rounds.
func runLoad(o options) error {
	ctx := context.Background()
	ctl, err := dialControl()
	if err != nil {
		return err
	}
	token := o.tok
	start := time.Now()
	var stages deliveries
	rings := make([]ring, o.devices)
	edgeHists := []string{"outpost_ingest_commit_duration_seconds", "outpost_ingest_ack_duration_seconds", "outpost_mqtt_live_hold_duration_seconds", "outpost_mqtt_live_delivery_duration_seconds"}
	devs := make([]*device, o.devices)
	for i := range devs {
		d, err := dialDevice(o.mqttAddr, fmt.Sprintf("dev%d", i), o.inflight, start)
		if err != nil {
			return fmt.Errorf("device %d: %w", i, err)
		}
		defer d.pub.Close()
		devs[i] = d
	}
	// Rounds: each runs the devices without phones, then with them, and
	// the ratio is of the rounds' totals. The machine's speed (fsync
	// latency above all) drifts by ±10 % from one run to the next, more
	// than the phones cost; pairing each run with phones with one just
	// before it, several times, keeps that drift out of the ratio.
	without := &series{suffix: ".without", acks: new(hist), hists: map[string]map[float64]float64{}}
	with := &series{suffix: ".with", acks: new(hist), hists: map[string]map[float64]float64{}}
	// measure runs the devices once for s: its rate, acks, CPU and the
	// edge's histograms over the run; the first round's is profiled.
	measure := func(s *series, round int) error {
		m0, err := scrape(o.httpAddr, token, edgeHists...)
		if err != nil {
			return err
		}
		stopProfile, err := ctl.profile(o.cpuProfile, o.trace, s.suffix, round == 0)
		if err != nil {
			return err
		}
		c0 := cpuNow(o.edgePid)
		r, err := publish(devs, rings, s.acks, o, start)
		s.cpu.add(c0, cpuNow(o.edgePid))
		stopProfile()
		if err != nil {
			return err
		}
		s.rates = append(s.rates, r)
		m1, err := scrape(o.httpAddr, token, edgeHists...)
		if err != nil {
			return err
		}
		addDelta(s.hists, m0, m1)
		return nil
	}
	var rssPerPhone []float64
	for round := range o.rounds {
		if err := measure(without, round); err != nil {
			return err
		}
		rss0, err := ctl.rss(o.edgePid)
		if err != nil {
			return err
		}
		phones, err := dialPhones(o.httpAddr, token, o, rings, &stages, start)
		if err != nil {
			return err
		}
		rss1, err := ctl.rss(o.edgePid)
		if err != nil {
			return err
		}
		rssPerPhone = append(rssPerPhone, (rss1-rss0)*1024/float64(max(1, o.phones)))
		if err := measure(with, round); err != nil {
			return err
		}
		for _, p := range phones {
			p.Close()
		}
		// The next run without phones starts once the edge has let go
		// of every one of them.
		if err := waitPhones(ctx, o.httpAddr, token, 0, 30*time.Second); err != nil {
			return err
		}
	}
	if o.memProfile != "" {
		if err := ctl.do("heap " + o.memProfile); err != nil {
			return err
		}
	}
	p50, p99, n := stages.totals()
	sumWithout, sumWith := sum(without.rates), sum(with.rates)
	ratios := make([]float64, len(with.rates))
	for i := range with.rates {
		ratios[i] = round(with.rates[i] / without.rates[i])
	}
	out := map[string]any{
		"devices": o.devices, "phones": o.phones, "rounds": o.rounds, "duration_s": o.duration.Seconds(), "live_interval_ms": o.liveInterval.Milliseconds(),
		"ingest_rps": round(sumWithout / float64(len(without.rates))), "ingest_rps_with_phones": round(sumWith / float64(len(with.rates))),
		"ratio": round(sumWith / sumWithout), "round_ratios": ratios,
		"cpu_pct_of_core":  map[string]any{"without_phones": without.cpu.pct(o), "with_phones": with.cpu.pct(o)},
		"phone_deliveries": n, "phone_p50_ms": round(p50), "phone_p99_ms": round(p99),
		"rss_kb_per_phone":    round(slices.Max(rssPerPhone)), // the first round's, mostly: later ones reuse the memory it left
		"publish_to_ack":      map[string]any{"without_phones": without.acks.summary(), "with_phones": with.acks.summary()},
		"phone_stages":        stages.breakdown(),
		"edge_without_phones": edgeStages(without.hists, edgeHists), "edge_with_phones": edgeStages(with.hists, edgeHists),
	}
	b, err := json.Marshal(out)
	if err != nil {
		return fmt.Errorf("result: %w", err)
	}
	fmt.Println(string(b))
	return nil
}

// series is one kind of run (without phones, or with them) over the
// rounds: each run's rate, and the acks, CPU and edge histogram counts of
// them all.
type series struct {
	suffix string // of its profiles' files
	rates  []float64
	acks   *hist
	cpu    cpuUse
	hists  map[string]map[float64]float64 // name → bucket bound → count
}

// cpuUse is the CPU seconds the edge's process and the load's spent in
// some runs: with the load on the same cores, what the phones cost the
// load process is CPU the edge does not get.
type cpuUse struct{ edge, load float64 }

// cpuNow: the edge's and the load's CPU seconds so far (0 where unknown).
func cpuNow(edgePid int) cpuUse {
	e, _ := benchproc.CPUSeconds(edgePid)
	l, _ := benchproc.CPUSeconds(os.Getpid())
	return cpuUse{e, l}
}

func (c *cpuUse) add(from, to cpuUse) { c.edge += to.edge - from.edge; c.load += to.load - from.load }

// pct: each process's share of one core over the runs (rounds of
// duration each).
func (c cpuUse) pct(o options) map[string]float64 {
	d := float64(o.rounds) * o.duration.Seconds() / 100
	return map[string]float64{"edge": round(c.edge / d), "load": round(c.load / d)}
}

// dialPhones connects o.phones phones, phone i subscribed to device
// i % o.devices, each delivery's stages noted in stages.
func dialPhones(addr, token string, o options, rings []ring, stages *deliveries, start time.Time) ([]*rawPhone, error) {
	var pool sync.Pool
	phones := make([]*rawPhone, 0, o.phones)
	for i := range o.phones {
		dev := i % o.devices
		p, err := dialPhone("ws://"+addr+"/mqtt", token, fmt.Sprintf("phone%d", i), fmt.Sprintf("sensors/dev%d/telemetry", dev), &pool, func(b []byte) {
			if us, n, ok := sentAt(b); ok {
				now := time.Since(start)
				d := delivery{total: now.Microseconds() - us, ack: -1, afterAck: -1}
				if re := rings[dev].at(n); re.t0.Load() == us {
					sent, acked := re.sent.Load(), re.acked.Load()
					d.wait = sent - us
					if acked >= sent {
						d.ack, d.afterAck = acked-sent, now.Microseconds()-acked
					}
				}
				stages.add(d)
			}
		})
		if err != nil {
			for _, p := range phones {
				p.Close()
			}
			return nil, fmt.Errorf("phone %d: %w", i, err)
		}
		phones = append(phones, p)
	}
	return phones, nil
}

// waitPhones polls the edge's outpost_mqtt_phone_sessions until it is n.
func waitPhones(ctx context.Context, addr, token string, n float64, d time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	for {
		m, err := benchproc.ScrapeAuth(http.DefaultClient, "http://"+addr+"/metrics", token)
		if err != nil {
			return err
		}
		if v, _ := m.Value("outpost_mqtt_phone_sessions"); v == n {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %v phone sessions: %w", n, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// addDelta adds each histogram's bucket counts between two scrapes to
// total.
func addDelta(total, before, after map[string]map[float64]float64) {
	for name, buckets := range after {
		if total[name] == nil {
			total[name] = map[float64]float64{}
		}
		for le, c := range buckets {
			total[name][le] += c - before[name][le]
		}
	}
}

func sum(v []float64) float64 {
	var s float64
	for _, x := range v {
		s += x
	}
	return s
}

// edgeStages: each edge histogram's quantiles over the counts of some
// runs (addDelta's).
func edgeStages(hists map[string]map[float64]float64, names []string) map[string]any {
	out := map[string]any{}
	for _, n := range names {
		out[strings.TrimPrefix(n, "outpost_")] = bucketQuantiles(hists[n])
	}
	return out
}

// writeHeap writes the heap profile: pprof's -sample_index=alloc_space
// shows what the whole process allocated, inuse_space what it holds.
func writeHeap(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	runtime.GC()
	return pprof.Lookup("heap").WriteTo(f, 0)
}

// pend is a publish in flight: its reading's ring entry and the run it
// counts in.
type pend struct {
	e  *ringEntry
	ph *phase
}

// phase is one run's acks.
type phase struct {
	acks  *hist
	acked atomic.Int64
}

// device is one publishing device and its readings' count.
type device struct {
	pub *rawmqtt.Publisher[pend]
	n   int // the last reading's number (the publishing goroutine's)
}

func dialDevice(addr, id string, inflight int, start time.Time) (*device, error) {
	pub, err := rawmqtt.Dial(addr, rawmqtt.Options[pend]{ClientID: id, Window: inflight,
		OnSend: func(p pend) { p.e.sent.Store(time.Since(start).Microseconds()) },
		OnAck: func(p pend, lat time.Duration) {
			p.e.acked.Store(time.Since(start).Microseconds())
			p.ph.acks.add(lat)
			p.ph.acked.Add(1)
		}})
	if err != nil {
		return nil, err
	}
	return &device{pub: pub}, nil
}

// publish has every device publish QoS 1 readings, o.inflight at a time,
// for o.duration, and returns the acknowledged rate. Each reading's body
// is made before the device waits for room in its window (its "t" is the
// phone latency's start); its write and its ack are noted in the device's
// ring, and write→ack in acks. It returns once every reading it published
// was acknowledged.
func publish(devs []*device, rings []ring, acks *hist, o options, start time.Time) (float64, error) {
	ph := &phase{acks: acks}
	stop := time.Now().Add(o.duration)
	var wg sync.WaitGroup
	errs := make(chan error, len(devs))
	for i, d := range devs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			topic := fmt.Sprintf("sensors/dev%d/telemetry", i)
			var body []byte
			for time.Now().Before(stop) {
				d.n++
				t0 := time.Since(start).Microseconds()
				body = fmt.Appendf(body[:0], `{"ts": %d, "metrics": {"t": %d, "n": %d}}`, time.Now().UnixMilli(), t0, d.n)
				e := rings[i].at(d.n)
				e.acked.Store(0)
				e.sent.Store(0)
				e.t0.Store(t0)
				if err := d.pub.Publish(topic, pend{e, ph}, body); err != nil {
					errs <- fmt.Errorf("device %d: %w", i, err)
					return
				}
			}
			if err := d.pub.Drain(30 * time.Second); err != nil {
				errs <- fmt.Errorf("device %d: %w", i, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return 0, err
	}
	return float64(ph.acked.Load()) / o.duration.Seconds(), nil
}

// sentAt extracts metrics "t" (µs since start) and "n" (the device's
// reading number) from a reading.
func sentAt(p []byte) (t int64, n int, ok bool) {
	t, ok = metric(p, `"t": `, ',')
	if !ok {
		return 0, 0, false
	}
	n64, ok := metric(p, `"n": `, '}')
	return t, int(n64), ok
}

func metric(p []byte, key string, end byte) (int64, bool) {
	i := bytes.Index(p, []byte(key))
	if i < 0 {
		return 0, false
	}
	p = p[i+len(key):]
	j := bytes.IndexByte(p, end)
	if j < 0 {
		return 0, false
	}
	v, err := strconv.ParseInt(string(p[:j]), 10, 64)
	return v, err == nil
}

func round(f float64) float64 { return float64(int64(f*100)) / 100 }

func login(addr, openid string) (string, error) {
	resp, err := http.Post("http://"+addr+"/api/v1/auth/login", "application/json", bytes.NewReader([]byte(`{"code":"dev:`+openid+`"}`)))
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var env struct {
		Data struct {
			AccessToken string `json:"access_token"`
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&env); err != nil || env.Data.AccessToken == "" {
		return "", fmt.Errorf("login: status %d: %v", resp.StatusCode, err)
	}
	return env.Data.AccessToken, nil
}
