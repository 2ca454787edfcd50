// Command apibench measures the edge HTTP API in-process: it builds the same
// parts as cmd/edge (bbolt store, token service, OPA policy engine, Fiber
// API) over a temporary data directory, preloads devices and readings, and
// drives the API on a loopback listener with concurrent keep-alive clients
// as a non-admin operator, so every request is really authorised by policy.
// It runs the mix with the policy and with the API's BypassPolicy baseline,
// alternating the two in slices so that the machine's other load biases
// neither, and prints one JSON line:
//
//	{"rps":…, "rps_no_policy":…, "ratio":…, "p50_ms":…, "p99_ms":…, "policy_eval_us_p50":…}
//
// rps, p50_ms and p99_ms are for the run with policy; policy_eval_us_p50 is
// the median of uncached Engine.Decide calls on the benchmark's own inputs.
// The load generator shares the machine with the server.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/valyala/fasthttp"

	"github.com/outpost-edge/outpost/pkg/api"
	"github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/policy"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/policies"
)

type options struct {
	devices, readings, clients int
	duration, warmup           time.Duration
	policyDir                  string
	cpuProfile                 string
	rounds                     int
}

func main() {
	var o options
	flag.IntVar(&o.devices, "devices", 100, "devices to preload")
	flag.IntVar(&o.readings, "readings", 2000, "readings per device to preload")
	flag.IntVar(&o.clients, "clients", 64, "concurrent HTTP clients")
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "measured duration of each run (with and without policy)")
	flag.DurationVar(&o.warmup, "warmup", time.Second, "unmeasured warm-up before each run")
	flag.StringVar(&o.policyDir, "policies", "policies", "policy directory (the built-in policies if it does not exist)")
	flag.IntVar(&o.rounds, "rounds", 5, "alternate the two modes in this many slices of duration/rounds each")
	flag.StringVar(&o.cpuProfile, "cpuprofile", "", "write a CPU profile of the measured runs (both modes) to this file")
	flag.Parse()
	if err := run(o); err != nil {
		fmt.Fprintf(os.Stderr, "apibench: %v\n", err)
		os.Exit(1)
	}
}

const (
	region   = "bench"
	operator = "bench-operator"
	t0       = int64(1732170000000)
)

type env struct {
	st     *store.Store
	tokens *auth.Service
	engine *policy.Engine
	reg    *prometheus.Registry
	ids    []string
}

func run(o options) error {
	dir, err := os.MkdirTemp("", "apibench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))

	e, err := build(dir, o, quiet)
	if err != nil {
		return err
	}
	defer e.st.Close()
	pair, err := e.tokens.Issue(context.Background(), operator)
	if err != nil {
		return err
	}

	on, err := startServer(e, false, quiet)
	if err != nil {
		return err
	}
	defer on.stop()
	off, err := startServer(e, true, quiet)
	if err != nil {
		return err
	}
	defer off.stop()
	// Sanity: the operator sees every device through the policy.
	if n, err := countDevices(on.client, on.addr, pair.AccessToken); err != nil || n != min(len(e.ids), 1000) {
		return fmt.Errorf("operator lists %d of %d devices (err %v): the policy setup is wrong", n, len(e.ids), err)
	}
	var stopProfile func()
	if o.cpuProfile != "" {
		if stopProfile, err = startProfile(o.cpuProfile); err != nil {
			return err
		}
	}
	// Alternate short slices of both modes, so that drift in the machine's
	// other load biases neither.
	var withPolicy, noPolicy sample
	slice := o.duration / time.Duration(o.rounds)
	for r := range o.rounds {
		warm := time.Duration(0)
		if r == 0 {
			warm = o.warmup
		}
		withPolicy.add(drive(on, pair.AccessToken, e.ids, o, warm, slice))
		noPolicy.add(drive(off, pair.AccessToken, e.ids, o, warm, slice))
	}
	if stopProfile != nil {
		stopProfile()
	}
	wp, np := withPolicy.result(), noPolicy.result()
	if withPolicy.firstErr != nil || noPolicy.firstErr != nil {
		return fmt.Errorf("%d requests with policy and %d without failed; first: %v %v", wp.errors, np.errors, withPolicy.firstErr, noPolicy.firstErr)
	}
	if len(withPolicy.lat) == 0 || len(noPolicy.lat) == 0 {
		return errors.New("no request succeeded")
	}
	evalUS, cachedUS, err := policyEval(dir, o, e.ids, quiet)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "apibench: %d clients, %d CPUs, %v per mode in %d alternating slices\n", o.clients, runtime.GOMAXPROCS(0), o.duration, o.rounds)
	fmt.Fprintf(os.Stderr, "apibench: with policy %.0f req/s (p50 %.2f ms, p99 %.2f ms, %d errors); without %.0f req/s (p50 %.2f ms, p99 %.2f ms); uncached Decide p50 %.1f µs, cached %.2f µs\n",
		wp.rps, wp.p50, wp.p99, wp.errors, np.rps, np.p50, np.p99, evalUS, cachedUS)
	fmt.Printf(`{"rps":%v,"rps_no_policy":%v,"ratio":%v,"p50_ms":%v,"p99_ms":%v,"policy_eval_us_p50":%v}`+"\n",
		round(wp.rps, 0), round(np.rps, 0), round(wp.rps/np.rps, 3),
		round(wp.p50, 3), round(wp.p99, 3), round(evalUS, 1))
	return nil
}

func round(f float64, digits int) float64 {
	p, _ := strconv.ParseFloat(strconv.FormatFloat(f, 'f', digits, 64), 64)
	return p
}

// build opens the store, preloads it and wires auth and policy as cmd/edge does.
func build(dir string, o options, log *slog.Logger) (*env, error) {
	st, err := store.Open(filepath.Join(dir, "edge.db"), store.Options{
		EdgeID: "bench-edge", Region: region, Clock: hlc.NewClock(nil, 5*time.Minute), NoSync: true,
	})
	if err != nil {
		return nil, err
	}
	e := &env{st: st, reg: prometheus.NewRegistry()}
	start := time.Now()
	for d := range o.devices {
		id := fmt.Sprintf("dev-%04d", d)
		e.ids = append(e.ids, id)
		it := store.Item{Device: id, ReceivedAt: t0}
		for i := range o.readings {
			it.Readings = append(it.Readings, store.Reading{TS: t0 + int64(i)*1000, ID: "m" + strconv.Itoa(i), Metrics: []store.Metric{
				{Name: "temp", Value: 20 + float64(i%100)/10}, {Name: "hum", Value: 40 + float64(i%50)},
			}})
		}
		if _, err := st.Ingest([]store.Item{it}, nil); err != nil {
			return nil, err
		}
		// Owned by someone else, in the operator's region: access is by
		// region, so the policy's region rule decides every request.
		if _, err := st.SetMeta(id, store.DeviceMeta{Owners: []string{"owner-" + id}, Region: region, Tags: map[string]string{"site": "b1"}}); err != nil {
			return nil, err
		}
	}
	if err := st.PutUser(store.User{OpenID: operator, Roles: []string{"operator"}, Regions: []string{"west", region}}); err != nil {
		return nil, err
	}
	fmt.Fprintf(os.Stderr, "apibench: preloaded %d devices × %d readings in %v\n", o.devices, o.readings, time.Since(start).Round(time.Millisecond))

	keys, err := auth.OpenKeyring(filepath.Join(dir, "keys"), nil)
	if err != nil {
		return nil, err
	}
	if e.tokens, err = auth.NewService(keys, st.DB(), auth.Config{Issuer: "bench-edge", AccessTTL: time.Hour, Logger: log}); err != nil {
		return nil, err
	}
	pdir, err := policies.Dir(o.policyDir, filepath.Join(dir, "policies"))
	if err != nil {
		return nil, err
	}
	if e.engine, err = policy.New(context.Background(), policy.Config{Dir: pdir, Registerer: e.reg, Logger: log}); err != nil {
		return nil, err
	}
	return e, nil
}

type result struct {
	rps, p50, p99 float64
	errors        int64
}

// sample accumulates the slices of one mode.
type sample struct {
	lat      []time.Duration
	elapsed  time.Duration
	errors   int64
	firstErr error
}

func (s *sample) add(o sample) {
	s.lat = append(s.lat, o.lat...)
	s.elapsed += o.elapsed
	s.errors += o.errors
	if s.firstErr == nil {
		s.firstErr = o.firstErr
	}
}

func (s *sample) result() result {
	if len(s.lat) == 0 {
		return result{errors: s.errors}
	}
	slices.Sort(s.lat)
	pct := func(p float64) float64 {
		return float64(s.lat[min(len(s.lat)-1, int(p*float64(len(s.lat))))]) / float64(time.Millisecond)
	}
	return result{rps: float64(len(s.lat)) / s.elapsed.Seconds(), p50: pct(0.50), p99: pct(0.99), errors: s.errors}
}

type server struct {
	addr   string
	client *fasthttp.HostClient
	stop   func()
}

// startServer serves the API as cmd/edge builds it, rate limits off.
func startServer(e *env, bypass bool, log *slog.Logger) (*server, error) {
	reg := prometheus.NewRegistry()
	srv, err := api.New(api.Config{
		EdgeID: "bench-edge", Region: region, BypassPolicy: bypass, Logger: log,
	}, api.Deps{
		Store: e.st, Tokens: e.tokens, Policy: e.engine, Registerer: reg, Gatherer: reg,
		DataChanged: e.engine.InvalidateData,
	})
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	addr := ln.Addr().String()
	return &server{
		addr:   addr,
		client: &fasthttp.HostClient{Addr: addr, MaxConns: 256, MaxIdleConnDuration: time.Minute, ReadTimeout: 10 * time.Second, WriteTimeout: 10 * time.Second},
		stop: func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = srv.Shutdown(ctx)
			<-served
		},
	}, nil
}

// drive runs o.clients workers against srv: warm unmeasured, then dur
// measured. Mix: 60 % latest, 30 % a readings page of 100, 10 % a device
// list page, over random devices.
func drive(srv *server, token string, ids []string, o options, warm, dur time.Duration) sample {
	var stop, measuring atomic.Bool
	var errs atomic.Int64
	var mu sync.Mutex
	var out sample
	var wg sync.WaitGroup
	for w := range o.clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), uint64(time.Now().UnixNano())))
			req, resp := fasthttp.AcquireRequest(), fasthttp.AcquireResponse()
			defer fasthttp.ReleaseRequest(req)
			defer fasthttp.ReleaseResponse(resp)
			req.Header.Set("Authorization", "Bearer "+token)
			mine := make([]time.Duration, 0, 1<<14)
			var firstErr error
			uri := make([]byte, 0, 128)
			for !stop.Load() {
				id := ids[rng.IntN(len(ids))]
				uri = append(append(uri[:0], "http://"...), srv.addr...)
				switch p := rng.IntN(100); {
				case p < 60:
					uri = append(append(append(uri, "/api/v1/devices/"...), id...), "/latest"...)
				case p < 90:
					from := t0 + int64(rng.IntN(o.readings))*1000
					uri = append(append(append(uri, "/api/v1/devices/"...), id...), "/readings?limit=100&from="...)
					uri = strconv.AppendInt(uri, from, 10)
				default:
					uri = append(uri, "/api/v1/devices?limit=20&cursor="...)
					if c := rng.IntN(len(ids) + 1); c > 0 {
						uri = append(uri, ids[c-1]...)
					}
				}
				req.SetRequestURIBytes(uri)
				start := time.Now()
				err := srv.client.Do(req, resp)
				d := time.Since(start)
				if !measuring.Load() {
					continue
				}
				if err == nil && resp.StatusCode() != fasthttp.StatusOK {
					err = fmt.Errorf("%s: %d %s", uri, resp.StatusCode(), resp.Body())
				}
				if err != nil {
					errs.Add(1)
					if firstErr == nil {
						firstErr = err
					}
					continue
				}
				mine = append(mine, d)
			}
			mu.Lock()
			out.lat = append(out.lat, mine...)
			if out.firstErr == nil {
				out.firstErr = firstErr
			}
			mu.Unlock()
		}()
	}
	time.Sleep(warm) // warm-up is unmeasured load, not synchronisation
	measuring.Store(true)
	begin := time.Now()
	time.Sleep(dur)
	measuring.Store(false)
	out.elapsed = time.Since(begin)
	stop.Store(true)
	wg.Wait()
	out.errors = errs.Load()
	return out
}

func countDevices(c *fasthttp.HostClient, addr, token string) (int, error) {
	req, resp := fasthttp.AcquireRequest(), fasthttp.AcquireResponse()
	defer fasthttp.ReleaseRequest(req)
	defer fasthttp.ReleaseResponse(resp)
	req.SetRequestURI("http://" + addr + "/api/v1/devices?limit=1000")
	req.Header.Set("Authorization", "Bearer "+token)
	if err := c.Do(req, resp); err != nil {
		return 0, err
	}
	var body struct {
		Data struct {
			Items []json.RawMessage `json:"items"`
		} `json:"data"`
	}
	if resp.StatusCode() != 200 {
		return 0, fmt.Errorf("list devices: %d %s", resp.StatusCode(), resp.Body())
	}
	if err := json.Unmarshal(resp.Body(), &body); err != nil {
		return 0, err
	}
	return len(body.Data.Items), nil
}

// policyEval measures Engine.Decide on the benchmark's inputs: the median
// of uncached evaluations (a fresh engine without a decision cache) and of
// cached ones (the engine as configured in the edge).
func policyEval(dir string, o options, ids []string, log *slog.Logger) (uncachedUS, cachedUS float64, err error) {
	pdir, err := policies.Dir(o.policyDir, filepath.Join(dir, "policies"))
	if err != nil {
		return 0, 0, err
	}
	ctx := context.Background()
	user := policy.User{OpenID: operator, Roles: []string{"operator"}, Regions: []string{"west", region}}
	inputs := make([]policy.Input, 0, len(ids)*2)
	for _, id := range ids {
		res := policy.Resource{Kind: "device", ID: id, Owners: []string{"owner-" + id}, Region: region, Tags: map[string]string{"site": "b1"}}
		inputs = append(inputs, policy.Input{User: user, Action: "device.read", Resource: res}, policy.Input{User: user, Action: "device.list", Resource: res})
	}
	med := func(cacheSize int, rounds int) (float64, error) {
		eng, err := policy.New(ctx, policy.Config{Dir: pdir, CacheSize: cacheSize, Logger: log})
		if err != nil {
			return 0, err
		}
		var ds []time.Duration
		for r := range rounds {
			for _, in := range inputs {
				start := time.Now()
				d, err := eng.Decide(ctx, in)
				el := time.Since(start)
				if err != nil {
					return 0, err
				}
				if !d.Allow {
					return 0, fmt.Errorf("policy denies %s on %s: %s", in.Action, in.Resource.ID, d.Reason)
				}
				if r > 0 { // the first round warms up (and fills the cache)
					ds = append(ds, el)
				}
			}
		}
		slices.Sort(ds)
		return float64(ds[len(ds)/2]) / float64(time.Microsecond), nil
	}
	if uncachedUS, err = med(-1, 11); err != nil {
		return 0, 0, err
	}
	if cachedUS, err = med(0, 11); err != nil {
		return 0, 0, err
	}
	return uncachedUS, cachedUS, nil
}
