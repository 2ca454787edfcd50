// Command apibench measures the edge HTTP API in-process: it builds the same
// parts as cmd/edge (bbolt store, token service, OPA policy engine, Fiber
// API) over a temporary data directory, preloads devices and readings, and
// drives the API on a loopback listener with concurrent keep-alive clients
// as a non-admin operator, so every request is really authorised by policy.
// It runs the mix once with the policy and once with the API's BypassPolicy
// baseline, and prints one JSON line:
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
}

func main() {
	var o options
	flag.IntVar(&o.devices, "devices", 100, "devices to preload")
	flag.IntVar(&o.readings, "readings", 2000, "readings per device to preload")
	flag.IntVar(&o.clients, "clients", 64, "concurrent HTTP clients")
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "measured duration of each run (with and without policy)")
	flag.DurationVar(&o.warmup, "warmup", time.Second, "unmeasured warm-up before each run")
	flag.StringVar(&o.policyDir, "policies", "policies", "policy directory (the built-in policies if it does not exist)")
	flag.StringVar(&o.cpuProfile, "cpuprofile", "", "write a CPU profile of the run with policy to this file")
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

	withPolicy, err := measure(e, pair.AccessToken, o, false, quiet, o.cpuProfile)
	if err != nil {
		return err
	}
	noPolicy, err := measure(e, pair.AccessToken, o, true, quiet, "")
	if err != nil {
		return err
	}
	evalUS, cachedUS, err := policyEval(dir, o, e.ids, quiet)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "apibench: with policy %.0f req/s (p50 %.2f ms, p99 %.2f ms, %d errors); without %.0f req/s (p50 %.2f ms, p99 %.2f ms); uncached Decide p50 %.1f µs, cached %.2f µs\n",
		withPolicy.rps, withPolicy.p50, withPolicy.p99, withPolicy.errors, noPolicy.rps, noPolicy.p50, noPolicy.p99, evalUS, cachedUS)
	fmt.Printf(`{"rps":%v,"rps_no_policy":%v,"ratio":%v,"p50_ms":%v,"p99_ms":%v,"policy_eval_us_p50":%v}`+"\n",
		round(withPolicy.rps, 0), round(noPolicy.rps, 0), round(withPolicy.rps/noPolicy.rps, 3),
		round(withPolicy.p50, 3), round(withPolicy.p99, 3), round(evalUS, 1))
	if withPolicy.errors > 0 || noPolicy.errors > 0 {
		return fmt.Errorf("%d requests with policy and %d without failed", withPolicy.errors, noPolicy.errors)
	}
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

// measure serves the API and drives it with o.clients workers.
func measure(e *env, token string, o options, bypass bool, log *slog.Logger, cpuProfile string) (result, error) {
	reg := prometheus.NewRegistry()
	srv, err := api.New(api.Config{
		EdgeID: "bench-edge", Region: region, BypassPolicy: bypass, Logger: log,
	}, api.Deps{
		Store: e.st, Tokens: e.tokens, Policy: e.engine, Registerer: reg, Gatherer: reg,
		DataChanged: e.engine.InvalidateData,
	})
	if err != nil {
		return result{}, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return result{}, err
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		<-served
	}()
	addr := ln.Addr().String()
	client := &fasthttp.HostClient{Addr: addr, MaxConns: o.clients * 2, MaxIdleConnDuration: time.Minute, ReadTimeout: 10 * time.Second, WriteTimeout: 10 * time.Second}

	// Sanity: the operator sees every device through the policy.
	if n, err := countDevices(client, addr, token); err != nil || n != len(e.ids) && len(e.ids) <= 100 {
		return result{}, fmt.Errorf("operator lists %d of %d devices (err %v): the policy setup is wrong", n, len(e.ids), err)
	}

	var stop atomic.Bool
	var measuring atomic.Bool
	var errs atomic.Int64
	var firstErr atomic.Value
	lat := make([][]time.Duration, o.clients)
	var wg sync.WaitGroup
	for w := range o.clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 42))
			req, resp := fasthttp.AcquireRequest(), fasthttp.AcquireResponse()
			defer fasthttp.ReleaseRequest(req)
			defer fasthttp.ReleaseResponse(resp)
			req.Header.Set("Authorization", "Bearer "+token)
			req.Header.SetHost(addr)
			mine := make([]time.Duration, 0, 1<<16)
			uri := make([]byte, 0, 128)
			for !stop.Load() {
				id := e.ids[rng.IntN(len(e.ids))]
				uri = append(uri[:0], "http://"...)
				uri = append(uri, addr...)
				switch p := rng.IntN(100); {
				case p < 60:
					uri = append(append(append(uri, "/api/v1/devices/"...), id...), "/latest"...)
				case p < 90:
					from := t0 + int64(rng.IntN(o.readings))*1000
					uri = append(append(append(uri, "/api/v1/devices/"...), id...), "/readings?limit=100&from="...)
					uri = strconv.AppendInt(uri, from, 10)
				default:
					uri = append(uri, "/api/v1/devices?limit=20&cursor="...)
					if c := rng.IntN(len(e.ids) + 1); c > 0 {
						uri = append(uri, e.ids[c-1]...)
					}
				}
				req.SetRequestURIBytes(uri)
				start := time.Now()
				err := client.Do(req, resp)
				d := time.Since(start)
				if !measuring.Load() {
					continue
				}
				if err == nil && resp.StatusCode() != fasthttp.StatusOK {
					err = fmt.Errorf("%s: %d %s", uri, resp.StatusCode(), resp.Body())
				}
				if err != nil {
					if errs.Add(1) == 1 {
						firstErr.Store(err)
					}
					continue
				}
				mine = append(mine, d)
			}
			lat[w] = mine
		}()
	}
	time.Sleep(o.warmup) // warm-up is unmeasured load, not synchronisation
	var stopProfile func()
	if cpuProfile != "" {
		if stopProfile, err = startProfile(cpuProfile); err != nil {
			stop.Store(true)
			wg.Wait()
			return result{}, err
		}
	}
	measuring.Store(true)
	begin := time.Now()
	time.Sleep(o.duration)
	measuring.Store(false)
	elapsed := time.Since(begin)
	stop.Store(true)
	wg.Wait()
	if stopProfile != nil {
		stopProfile()
	}
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	if len(all) == 0 {
		return result{}, errors.New("no request succeeded")
	}
	slices.Sort(all)
	pct := func(p float64) float64 {
		return float64(all[min(len(all)-1, int(p*float64(len(all))))]) / float64(time.Millisecond)
	}
	r := result{rps: float64(len(all)) / elapsed.Seconds(), p50: pct(0.50), p99: pct(0.99), errors: errs.Load()}
	if err, _ := firstErr.Load().(error); err != nil {
		fmt.Fprintf(os.Stderr, "apibench: first error: %v\n", err)
	}
	mode := "with policy"
	if bypass {
		mode = "without policy"
	}
	fmt.Fprintf(os.Stderr, "apibench: %s: %d requests in %v on %d CPUs\n", mode, len(all), elapsed.Round(time.Millisecond), runtime.GOMAXPROCS(0))
	return r, nil
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
