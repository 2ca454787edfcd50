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
	"slices"
	"strconv"
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
	var lat latencies
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
	without := publish(devs, o, start)

	runtime.GC()
	rss0 := benchproc.StatusMB(os.Getpid())["VmRSS"]
	var pool sync.Pool
	for i := range o.phones {
		dev := i % o.devices
		p, err := dialPhone("ws://"+e.HTTPAddr()+"/mqtt", token, fmt.Sprintf("phone%d", i), fmt.Sprintf("sensors/dev%d/telemetry", dev), &pool, func(b []byte) {
			if us, ok := sentAt(b); ok {
				lat.add(time.Since(start) - time.Duration(us)*time.Microsecond)
			}
		})
		if err != nil {
			return fmt.Errorf("phone %d: %w", i, err)
		}
		defer p.Close()
	}
	runtime.GC()
	rss1 := benchproc.StatusMB(os.Getpid())["VmRSS"]
	lat.reset()
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
	with := publish(devs, o, start)
	pprof.StopCPUProfile()
	if o.memProfile != "" {
		if err := writeHeap(o.memProfile); err != nil {
			return err
		}
	}
	p50, p99, n := lat.quantiles()
	out := map[string]any{
		"devices": o.devices, "phones": o.phones, "duration_s": o.duration.Seconds(), "live_interval_ms": cfg.MQTT.LiveInterval.Milliseconds(),
		"ingest_rps": round(without), "ingest_rps_with_phones": round(with), "ratio": round(with / without),
		"phone_deliveries": n, "phone_p50_ms": round(p50), "phone_p99_ms": round(p99),
		"rss_kb_per_phone": round((rss1 - rss0) * 1024 / float64(max(1, o.phones))),
	}
	b, _ := json.Marshal(out)
	fmt.Println(string(b))
	return nil
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
// for o.duration, and returns the acknowledged rate.
func publish(devs []paho.Client, o options, start time.Time) float64 {
	var acked atomic.Int64
	stop := time.Now().Add(o.duration)
	var wg sync.WaitGroup
	for i, c := range devs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			topic := fmt.Sprintf("sensors/dev%d/telemetry", i)
			window := make(chan paho.Token, o.inflight)
			n := 0
			for time.Now().Before(stop) {
				n++
				body := fmt.Sprintf(`{"ts": %d, "metrics": {"t": %d, "n": %d}}`, time.Now().UnixMilli(), time.Since(start).Microseconds(), n)
				if len(window) == cap(window) {
					if t := <-window; t.WaitTimeout(30*time.Second) && t.Error() == nil {
						acked.Add(1)
					}
				}
				window <- c.Publish(topic, 1, false, body)
			}
			for len(window) > 0 {
				if t := <-window; t.WaitTimeout(30*time.Second) && t.Error() == nil {
					acked.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	return float64(acked.Load()) / o.duration.Seconds()
}

// sentAt extracts metric "t" (µs since start) from a reading.
func sentAt(p []byte) (int64, bool) {
	i := bytes.Index(p, []byte(`"t": `))
	if i < 0 {
		return 0, false
	}
	p = p[i+5:]
	j := bytes.IndexByte(p, ',')
	if j < 0 {
		return 0, false
	}
	v, err := strconv.ParseInt(string(p[:j]), 10, 64)
	return v, err == nil
}

type latencies struct {
	mu sync.Mutex
	d  []time.Duration
}

func (l *latencies) add(d time.Duration) { l.mu.Lock(); l.d = append(l.d, d); l.mu.Unlock() }
func (l *latencies) reset()              { l.mu.Lock(); l.d = l.d[:0]; l.mu.Unlock() }

func (l *latencies) quantiles() (p50, p99 float64, n int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.d) == 0 {
		return 0, 0, 0
	}
	slices.Sort(l.d)
	q := func(f float64) float64 { return float64(l.d[int(f*float64(len(l.d)-1))].Microseconds()) / 1000 }
	return q(0.5), q(0.99), len(l.d)
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
