// Command livebench measures the live feed: an edge (in this process, as
// cmd/edge builds it: store, writer, embedded broker, API) ingests from
// -devices MQTT devices publishing QoS 1 as fast as it acknowledges, first
// without phones, then with -phones MQTT-over-WebSocket sessions at /mqtt,
// each subscribed to one device's telemetry. It prints one JSON line:
//
//	{"ingest_rps":…, "ingest_rps_with_phones":…, "ratio":…, "phone_p50_ms":…, "phone_p99_ms":…, "rss_kb_per_phone":…, …}
//
// Phones are minimal MQTT 3.1.1 clients over WebSocket (phone.go: one
// goroutine and 2 KiB of read buffers each), devices are paho clients.
// Phones get each topic at most once per the edge's mqtt.live_interval
// (-live-interval), so phone_deliveries is at most phones × duration /
// interval. -cpuprofile and -memprofile profile the run with phones.
//
// Where the latency goes (stages.go): phone_stages splits each delivery
// into the device's wait for room in its window (a reading's timestamp is
// taken before it), its publish to its PUBACK (the durable commit is in
// it), and the PUBACK to the phone's read (the live feed's hold, the
// fan-out, the phone's write and read), with the stages' mean over the
// slowest 1 %; publish_to_ack is every reading's, in both runs; edge_* are
// the edge's histograms over each run (commit, ack, and a live message from
// its commit to the mirror and to the phone's WebSocket), as bucket bounds.
//
// Caveats: the load generator shares the process and the machine with the
// edge, so rss_kb_per_phone includes each phone's small client as well as
// the edge's session, and the clients' CPU is the edge's too; latency is
// from the device's publish call to the phone's read, both here.
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
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/outpost-edge/outpost/internal/benchproc"
	"github.com/outpost-edge/outpost/pkg/edge"
)

type options struct {
	devices, phones, inflight int
	duration, liveInterval    time.Duration
	cpuProfile, memProfile    string
}

func main() {
	var o options
	flag.IntVar(&o.devices, "devices", 100, "publishing devices")
	flag.IntVar(&o.phones, "phones", 1000, "phone WebSocket sessions, each subscribed to one device")
	flag.IntVar(&o.inflight, "inflight", 8, "QoS 1 publishes each device keeps in flight")
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "measured duration of each run (without and with phones)")
	flag.DurationVar(&o.liveInterval, "live-interval", 0, "the edge's mqtt.live_interval (0: its default)")
	flag.StringVar(&o.cpuProfile, "cpuprofile", "", "write a CPU profile of the run with phones to this file")
	flag.StringVar(&o.memProfile, "memprofile", "", "write a heap profile (allocations of the whole process, live heap after the run with phones) to this file")
	flag.Parse()
	if err := run(o); err != nil {
		fmt.Fprintf(os.Stderr, "livebench: %v\n", err)
		os.Exit(1)
	}
}

func run(o options) error {
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

	start := time.Now()
	var stages deliveries
	rings := make([]ring, o.devices)
	acks := new(hist)
	edgeHists := []string{"outpost_ingest_commit_duration_seconds", "outpost_ingest_ack_duration_seconds", "outpost_mqtt_live_hold_duration_seconds", "outpost_mqtt_live_delivery_duration_seconds"}
	m0, err := scrape(e.HTTPAddr(), token, edgeHists...)
	if err != nil {
		return err
	}
	devs := make([]paho.Client, o.devices)
	for i := range devs {
		c := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + e.MQTTAddr()).
			SetClientID(fmt.Sprintf("dev%d", i)).SetAutoReconnect(false).SetMaxResumePubInFlight(o.inflight))
		if t := c.Connect(); !t.WaitTimeout(10*time.Second) || t.Error() != nil {
			return fmt.Errorf("device %d connect: %v", i, t.Error())
		}
		defer c.Disconnect(50)
		devs[i] = c
	}
	without := publish(devs, rings, acks, o, start)
	acksWithout := acks.summary()
	acks.reset()
	m1, err := scrape(e.HTTPAddr(), token, edgeHists...)
	if err != nil {
		return err
	}

	runtime.GC()
	rss0 := benchproc.StatusMB(os.Getpid())["VmRSS"]
	var pool sync.Pool
	for i := range o.phones {
		dev := i % o.devices
		p, err := dialPhone("ws://"+e.HTTPAddr()+"/mqtt", token, fmt.Sprintf("phone%d", i), fmt.Sprintf("sensors/dev%d/telemetry", dev), &pool, func(b []byte) {
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
			return fmt.Errorf("phone %d: %w", i, err)
		}
		defer p.Close()
	}
	runtime.GC()
	rss1 := benchproc.StatusMB(os.Getpid())["VmRSS"]
	stages.reset()
	m2, err := scrape(e.HTTPAddr(), token, edgeHists...)
	if err != nil {
		return err
	}
	if o.cpuProfile != "" {
		f, err := os.Create(o.cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
	}
	with := publish(devs, rings, acks, o, start)
	pprof.StopCPUProfile()
	m3, err := scrape(e.HTTPAddr(), token, edgeHists...)
	if err != nil {
		return err
	}
	if o.memProfile != "" {
		if err := writeHeap(o.memProfile); err != nil {
			return err
		}
	}
	p50, p99, n := stages.totals()
	out := map[string]any{
		"devices": o.devices, "phones": o.phones, "duration_s": o.duration.Seconds(), "live_interval_ms": cfg.MQTT.LiveInterval.Milliseconds(),
		"ingest_rps": round(without), "ingest_rps_with_phones": round(with), "ratio": round(with / without),
		"phone_deliveries": n, "phone_p50_ms": round(p50), "phone_p99_ms": round(p99),
		"rss_kb_per_phone":    round((rss1 - rss0) * 1024 / float64(max(1, o.phones))),
		"publish_to_ack":      map[string]any{"without_phones": acksWithout, "with_phones": acks.summary()},
		"phone_stages":        stages.breakdown(),
		"edge_without_phones": edgeStages(m0, m1, edgeHists), "edge_with_phones": edgeStages(m2, m3, edgeHists),
	}
	b, _ := json.Marshal(out)
	fmt.Println(string(b))
	return nil
}

// edgeStages: each edge histogram's quantiles over one run.
func edgeStages(before, after map[string]map[float64]float64, names []string) map[string]any {
	out := map[string]any{}
	for _, n := range names {
		out[strings.TrimPrefix(n, "outpost_")] = bucketQuantiles(before[n], after[n])
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

// publish has every device publish QoS 1 readings, o.inflight at a time,
// for o.duration, and returns the acknowledged rate. Each reading's body
// is made before the device waits for room in its window (its "t" is the
// phone latency's start); its publish call and its ack are noted in the
// device's ring, and publish→ack in acks.
func publish(devs []paho.Client, rings []ring, acks *hist, o options, start time.Time) float64 {
	var acked atomic.Int64
	stop := time.Now().Add(o.duration)
	var wg sync.WaitGroup
	for i, c := range devs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			topic := fmt.Sprintf("sensors/dev%d/telemetry", i)
			type pending struct {
				tok paho.Token
				e   *ringEntry
			}
			room := make(chan struct{}, o.inflight) // a slot per publish in flight
			window := make(chan pending, o.inflight)
			done := make(chan struct{})
			go func() { // the device's acks, in publish order
				defer close(done)
				for p := range window {
					if p.tok.WaitTimeout(30*time.Second) && p.tok.Error() == nil {
						now := time.Since(start).Microseconds()
						p.e.acked.Store(now)
						acks.add(time.Duration(now-p.e.sent.Load()) * time.Microsecond)
						acked.Add(1)
					}
					<-room
				}
			}()
			n := 0
			for time.Now().Before(stop) {
				n++
				t0 := time.Since(start).Microseconds()
				body := fmt.Sprintf(`{"ts": %d, "metrics": {"t": %d, "n": %d}}`, time.Now().UnixMilli(), t0, n)
				room <- struct{}{}
				e := rings[i].at(n)
				e.acked.Store(0)
				e.t0.Store(t0)
				e.sent.Store(time.Since(start).Microseconds())
				window <- pending{c.Publish(topic, 1, false, body), e}
			}
			close(window)
			<-done
		}()
	}
	wg.Wait()
	return float64(acked.Load()) / o.duration.Seconds()
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
