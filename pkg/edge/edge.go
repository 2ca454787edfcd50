// Package edge assembles an Outpost edge from its parts — the store
// (bbolt), the ingest writer, the embedded MQTT broker or a subscriber to an
// external one, the HTTP API, policies, tokens and, when joined to a cloud,
// the syncer — and owns its configuration: built-in defaults, overridden by
// a YAML file, overridden by command-line flags. It is the edge's
// counterpart of pkg/cloud: Parse or DefaultConfig, Validate, Start, Run,
// Shutdown.
package edge

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime/debug"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"golang.org/x/sys/unix"

	"github.com/outpost-edge/outpost/pkg/alerting"
	"github.com/outpost-edge/outpost/pkg/api"
	"github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/auth/federation"
	"github.com/outpost-edge/outpost/pkg/broker"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/ingest"
	"github.com/outpost-edge/outpost/pkg/obs"
	"github.com/outpost-edge/outpost/pkg/policy"
	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/syncer"
	"github.com/outpost-edge/outpost/pkg/wechat"
	"github.com/outpost-edge/outpost/policies"
)

// Edge is a started edge. Every goroutine it starts is owned by it: each
// stops when its context ends, and Shutdown waits for all of them before
// closing the store.
type Edge struct {
	cfg Config
	log *slog.Logger

	httpLn   net.Listener
	admin    *obs.Admin // nil unless cfg.Pprof
	st       *store.Store
	tokens   *auth.Service
	engine   *policy.Engine
	writer   *ingest.Writer
	brk      *broker.Broker     // embedded broker; with an external one, the broker of phones only
	sub      *ingest.Subscriber // external broker, or nil
	sy       *syncer.Syncer     // nil when standalone
	srv      *api.Server
	mqttAddr string

	stopWriter context.CancelFunc
	writerDone chan struct{}
	stopSub    context.CancelFunc
	alerts     *alerting.Runner
	stopBg     context.CancelFunc // background loops: they end with Run's ctx, or in Shutdown
	wg         sync.WaitGroup
	errc       chan error // a part that failed while serving

	undo []func() // closes what Start opened, in reverse, if Start fails
}

// Start opens the store and every part, binds the HTTP and MQTT ports and
// starts the ingest writer and the broker, so devices may connect when it
// returns; Run serves the API. On error it returns with nothing held open.
// level is the logger's level, changed at run time through the admin
// address (cfg.Pprof).
func Start(ctx context.Context, cfg Config, log *slog.Logger, level *slog.LevelVar) (*Edge, error) {
	e := &Edge{cfg: cfg, log: log, errc: make(chan error, 4)}
	started := false
	defer func() {
		if !started {
			e.abort()
		}
	}()
	var err error
	if cfg.MemoryLimitMB > 0 && os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(cfg.MemoryLimitMB << 20)
	}
	if cfg.GCPercent > 0 && os.Getenv("GOGC") == "" {
		debug.SetGCPercent(cfg.GCPercent)
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("create data dir: %w", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	obs.RegisterBuildInfo(reg, "edge")

	// Listen first, so a busy port fails fast before anything is opened.
	if e.httpLn, err = net.Listen("tcp", cfg.HTTP); err != nil {
		return nil, fmt.Errorf("http listen %s: %w", cfg.HTTP, err)
	}
	e.onAbort(func() { _ = e.httpLn.Close() })

	drift := cfg.Cloud.MaxClockDrift
	if drift <= 0 {
		drift = DefaultMaxClockDrift
	}
	var now func() time.Time
	if off := cfg.UnsafeClockOffset; off != 0 {
		log.Warn("TESTING ONLY: HLC wall clock shifted", "offset", off)
		now = func() time.Time { return time.Now().Add(off) }
	}
	clock := hlc.NewClock(now, drift)
	if e.st, err = store.Open(filepath.Join(cfg.DataDir, "edge.db"), store.Options{
		EdgeID: cfg.ID, Region: cfg.Region, Clock: clock,
		MaxDeadLetters: cfg.Ingest.MaxDeadLetters, NoSync: cfg.UnsafeNoSync,
		HoldOutboxForRules: true, // the rule runner reads what it has not evaluated from the outbox
	}); err != nil {
		return nil, err
	}
	e.onAbort(func() { _ = e.st.Close() })
	registerStoreMetrics(reg, e.st)

	keys, err := auth.OpenKeyring(filepath.Join(cfg.DataDir, "keys"), nil)
	if err != nil {
		return nil, fmt.Errorf("open keyring: %w", err)
	}
	if e.tokens, err = auth.NewService(keys, e.st.DB(), auth.Config{
		Issuer: cfg.ID, AccessTTL: cfg.Auth.AccessTTL, RefreshTTL: cfg.Auth.RefreshTTL,
		KeyRotation: cfg.Auth.KeyRotation, RefreshReuseGrace: cfg.Auth.RefreshReuseGrace, Logger: log,
	}); err != nil {
		return nil, fmt.Errorf("auth: %w", err)
	}

	policyDir, err := policies.Dir(cfg.Policy.Dir, filepath.Join(cfg.DataDir, "policies"))
	if err != nil {
		return nil, err
	}
	if policyDir != cfg.Policy.Dir {
		log.Warn("policy directory not found; using the built-in policies", "wanted", cfg.Policy.Dir, "using", policyDir)
	}
	joined := len(cfg.Cloud.URLs) > 0
	var builtin []policy.Module // what the edge returns to when the cloud distributes no policies
	if joined {
		if builtin, err = localModules(policyDir); err != nil {
			return nil, err
		}
		if policyDir, err = cloudPolicyDir(policyDir, cfg.DataDir); err != nil {
			return nil, err
		}
	}
	// A new policy may take a phone's access away: its live subscriptions
	// are re-checked at once. The broker is made below; the engine calls
	// this only on a change after its first load, which comes from Run's
	// poll or the syncer's install, both started after Start.
	policyChanged := func() { e.brk.RecheckPhones() }
	if e.engine, err = policy.New(ctx, policy.Config{Dir: policyDir, Registerer: reg, Logger: log, OnChange: policyChanged}); err != nil {
		return nil, fmt.Errorf("load policies from %s: %w", policyDir, err)
	}

	limits := ingest.DefaultLimits
	// A reading older than retention would be acknowledged and then deleted
	// by the next retention pass: refuse it at ingest (a dead letter).
	limits.MaxAge = cfg.Ingest.Retention
	// Rules run on what the writer committed, after it acknowledged it;
	// they publish through the broker, which is made after the writer.
	var publish lateDownlink
	var cloudRules []rules.Rule // what the cloud last distributed, in force before the first pull
	if joined {
		if cloudRules, err = syncer.CachedRules(e.st); err != nil {
			log.Warn("the cached cloud rules are unreadable; waiting for the cloud's", "err", err)
		}
	}
	// The runner's saves ride the writer's commits; the writer wakes the
	// runner after each (the runner is made next, before either runs).
	e.writer = ingest.NewWriter(e.st, ingest.NewDecoder(limits), ingest.Config{
		MaxBatch: cfg.Ingest.MaxBatch, Linger: cfg.Ingest.Linger, Committed: func() { e.alerts.Notify() },
		QuotaBytes: cfg.Ingest.QuotaMB << 20, MinFreeBytes: cfg.Ingest.MinFreeMB << 20,
		FreeBytes:             func() (int64, error) { return freeBytes(cfg.DataDir) },
		UnsafeAckBeforeCommit: cfg.UnsafeAckBeforeCommit,
	}, reg, log.With("component", "ingest"))
	e.alerts = alerting.New(alerting.Config{Store: e.st, Saver: e.writer, Downlink: &publish, Now: now, Stamp: clock.Now, Cloud: cloudRules,
		Logger: log.With("component", "rules"), Registerer: reg})

	var login api.Login
	if cfg.WeChat.AppID != "" {
		wc, err := wechat.New(wechat.Config{AppID: cfg.WeChat.AppID, Secret: cfg.WeChat.Secret, APIBase: cfg.WeChat.APIBase})
		if err != nil {
			return nil, fmt.Errorf("wechat: %w", err)
		}
		login = api.WeChatLogin{Client: wc, Tokens: e.tokens}
	}
	var loc *api.Location
	if lat, lng, ok, _ := ParseLocation(cfg.Location); ok {
		loc = &api.Location{Lat: lat, Lng: lng}
	}

	// The writer outlives the broker: it commits what devices sent until
	// the broker has closed (see Shutdown).
	writerCtx, stopWriter := context.WithCancel(context.Background())
	e.stopWriter, e.writerDone = stopWriter, make(chan struct{})
	go func() { defer close(e.writerDone); _ = e.writer.Run(writerCtx) }()
	e.onAbort(func() { e.stopWriter(); <-e.writerDone })

	var downlink api.Downlink
	var presence api.Presence // nil with an external broker: online from last_seen
	phones := &phoneAuth{}    // its API is set below, before HTTP serves
	e.stopSub = func() {}
	if cfg.MQTT.Broker == "" {
		bc := broker.DefaultConfig()
		bc.Phones = phones
		bc.Listen, bc.StatePath = cfg.MQTT.Listen, filepath.Join(cfg.DataDir, "broker.db")
		bc.Credentials, bc.AllowAnonymous = cfg.MQTT.Devices, cfg.MQTT.AllowAnonymous
		bc.ConnectTimeout, bc.MaxConnections = cfg.MQTT.ConnectTimeout, cfg.MQTT.MaxConnections
		bc.LiveInterval, bc.PhoneRecheck = cfg.MQTT.LiveInterval, cfg.phoneRecheck
		bc.Downlinks, bc.Registerer, bc.Logger = downlinks{e.st}, reg, log
		if e.brk, err = broker.New(bc, e.writer); err != nil {
			return nil, err
		}
		e.onAbort(func() { _ = e.brk.Close() })
		// Start logs how open the broker is (credentials, anonymous, or
		// loopback only).
		if err := e.brk.Start(); err != nil {
			return nil, err
		}
		downlink, presence, e.mqttAddr = e.brk, e.brk, e.brk.Addr()
	} else {
		clientID := cfg.MQTT.ClientID
		if clientID == "" {
			clientID = "outpost-" + cfg.ID
		}
		// Phones still connect to the edge (/mqtt): to an embedded broker
		// that serves them only, fed with what the edge committed and
		// with its own downlinks and alerts.
		pc := broker.DefaultConfig()
		pc.Listen, pc.Phones, pc.Registerer, pc.Logger = "", phones, reg, log
		pc.LiveInterval, pc.PhoneRecheck = cfg.MQTT.LiveInterval, cfg.phoneRecheck
		if e.brk, err = broker.New(pc, nil); err != nil {
			return nil, err
		}
		e.onAbort(func() { _ = e.brk.Close() })
		if err := e.brk.Start(); err != nil {
			return nil, err
		}
		e.sub = ingest.NewSubscriber(ingest.SubscriberConfig{
			BrokerURL: cfg.MQTT.Broker, ClientID: clientID, Username: cfg.MQTT.Username, Password: cfg.MQTT.Password,
			Downlinks: downlinks{e.st}, Committed: e.brk.Forward, Logger: log.With("component", "mqtt"),
		}, e.writer)
		downlink, e.mqttAddr = teeDownlink{e.sub, e.brk}, cfg.MQTT.Broker
	}
	dataChanged := func() {
		e.engine.InvalidateData()
		e.brk.RecheckPhones()
	}

	publish.set(downlink)

	// A joined edge syncs with the cloud and logs users in through it.
	var apiTokens api.Tokens = e.tokens
	var syncStatus api.SyncStatus
	var directory api.Directory
	if joined {
		var id *federation.Identity
		if e.sy, id, err = newSyncer(cfg, now, e.st, e.tokens, login, downlink, e.engine, builtin, e.alerts, dataChanged, reg, log); err != nil {
			return nil, err
		}
		apiTokens, login, syncStatus, directory = id, id, e.sy, e.sy
	}

	writer := e.writer
	if e.srv, err = api.New(api.Config{
		EdgeID: cfg.ID, Region: cfg.Region, Location: loc, Advertise: cfg.Advertise,
		Admins: cfg.Admins, DevLogin: cfg.DevLogin, BodyLimit: cfg.API.BodyLimitKB << 10,
		RateLimitPerIP: cfg.API.RateLimitPerIP, RateLimitPerUser: cfg.API.RateLimitPerUser,
		TrustedProxies: cfg.API.TrustedProxies, MaxConns: cfg.API.MaxConns, MaxConnsPerIP: cfg.API.MaxConnsPerIP,
		OnlineWindow: cfg.API.OnlineWindow, BypassPolicy: cfg.API.BypassPolicy, Logger: log.With("component", "api"),
	}, api.Deps{
		Store: e.st, Tokens: apiTokens, Login: login, Policy: e.engine, Downlink: downlink,
		Sync: syncStatus, Directory: directory, Rules: e.alerts, Alerts: e.st, Presence: presence,
		Ready: func() string {
			if writer.Backpressure() {
				return "disk quota reached: ingest is applying backpressure"
			}
			return ""
		},
		Live:       e.brk,
		Registerer: reg, Gatherer: reg, DataChanged: dataChanged,
	}); err != nil {
		return nil, err
	}
	phones.srv = e.srv

	if cfg.Pprof != "" {
		if e.admin, err = obs.ListenAdmin(cfg.Pprof, level, log); err != nil {
			return nil, err
		}
	}
	e.stopBg = func() {}
	started, e.undo = true, nil // from here on Shutdown owns every part
	return e, nil
}

// onAbort registers how to close something Start opened, should a later
// step fail.
func (e *Edge) onAbort(f func()) { e.undo = append(e.undo, f) }

func (e *Edge) abort() {
	for i := len(e.undo) - 1; i >= 0; i-- {
		e.undo[i]()
	}
	e.undo = nil
}

// HTTPAddr is the address the API listens on.
func (e *Edge) HTTPAddr() string { return e.httpLn.Addr().String() }

// MQTTAddr is the embedded broker's address, or the external broker's URL.
func (e *Edge) MQTTAddr() string { return e.mqttAddr }

// Run serves the API and runs the background loops (policy reload, token
// maintenance, retention, the syncer, the external-broker subscriber, the
// admin listener) until ctx ends or a part fails; then call Shutdown.
func (e *Edge) Run(ctx context.Context) error {
	cfg, log := e.cfg, e.log
	// The background loops stop as soon as ctx ends (a signal), as the
	// syncer must before Shutdown flushes; HTTP and MQTT drain in Shutdown.
	bg, stopBg := context.WithCancel(ctx)
	e.stopBg = stopBg
	e.wg.Add(4)
	go func() { defer e.wg.Done(); e.srv.Run(bg) }()
	go func() { defer e.wg.Done(); _ = e.engine.Run(bg) }()
	go func() { defer e.wg.Done(); _ = e.tokens.Run(bg) }()
	go func() { defer e.wg.Done(); retain(bg, e.st, cfg, log) }()
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		if err := e.alerts.Run(bg); err != nil {
			e.errc <- err
		}
	}()
	if e.sy != nil {
		e.wg.Add(1)
		go func() { defer e.wg.Done(); _ = e.sy.Run(bg) }()
	}
	if e.sub != nil {
		subCtx, stopSub := context.WithCancel(context.Background())
		e.stopSub = stopSub
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			if err := e.sub.Run(subCtx); err != nil {
				e.errc <- err
			}
		}()
	}
	go func() {
		if err := e.srv.Serve(e.httpLn); err != nil {
			e.errc <- err
		}
	}()
	adminAddr := ""
	if e.admin != nil {
		adminAddr = e.admin.Addr()
		e.wg.Add(1)
		go func() {
			defer e.wg.Done()
			if err := e.admin.Run(bg); err != nil {
				log.Error("admin listener", "err", err)
			}
		}()
	}
	log.Info("outpost edge started", "id", cfg.ID, "http", e.HTTPAddr(), "mqtt", e.mqttAddr,
		"embedded_broker", cfg.MQTT.Broker == "", "data", cfg.DataDir, "dev_login", cfg.DevLogin, "admin", adminAddr)

	select {
	case <-ctx.Done():
		log.Info("shutting down", "grace", cfg.ShutdownGrace)
		return nil
	case err := <-e.errc:
		return err
	}
}

// Shutdown stops the edge within timeout, in an order that loses nothing:
//
//  1. HTTP stops accepting and in-flight API requests finish (their writes
//     are durable and their downlinks go out through the broker, which is
//     still up);
//  2. MQTT stops accepting and device connections close; publishes not yet
//     committed are released unacknowledged, so devices resend them;
//  3. the writer commits and acknowledges the batches it holds;
//  4. the syncer flushes to the cloud, best effort within the timeout;
//  5. background loops stop, then the store (bbolt) closes.
//
// The caller bounds the whole stop (cmd/edge exits 1 past the grace period
// rather than hang its supervisor): bbolt and the broker state are
// crash-safe, so nothing acknowledged is lost either way.
func (e *Edge) Shutdown(timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var errs []error
	if err := e.srv.Shutdown(ctx); err != nil {
		errs = append(errs, fmt.Errorf("http drain: %w", err))
	}
	// The listener is closed even if Serve had not registered it yet (a
	// signal right after start).
	_ = e.httpLn.Close()
	e.stopSub()
	if e.brk != nil {
		if err := e.brk.Close(); err != nil {
			errs = append(errs, fmt.Errorf("mqtt close: %w", err))
		}
	}
	e.stopWriter()
	<-e.writerDone
	if e.sy != nil {
		// Push what the outbox holds, after the writer committed its last
		// batch and before the store closes.
		if err := e.sy.Flush(ctx); err != nil {
			e.log.Warn("syncer flush incomplete; the outbox keeps the rest for next start", "err", err)
		}
	}
	e.stopBg()
	e.wg.Wait()
	if err := e.st.Close(); err != nil {
		errs = append(errs, fmt.Errorf("close store: %w", err))
	}
	return errors.Join(errs...)
}

func freeBytes(dir string) (int64, error) {
	var s unix.Statfs_t
	if err := unix.Statfs(dir, &s); err != nil {
		return 0, fmt.Errorf("statfs %s: %w", dir, err)
	}
	return int64(s.Bavail) * int64(s.Bsize), nil
}

func registerStoreMetrics(reg prometheus.Registerer, st *store.Store) {
	gauge := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f)
	}
	reg.MustRegister(
		gauge("outpost_store_file_bytes", "Size of the edge database file.", func() float64 { return float64(st.FileSize()) }),
		gauge("outpost_store_used_bytes", "Bytes in use in the edge database (file less free pages).", func() float64 {
			u, _ := st.Usage()
			return float64(u)
		}),
		gauge("outpost_store_readings", "Readings stored.", func() float64 { return float64(st.Counts().Readings) }),
		gauge("outpost_store_devices", "Devices registered.", func() float64 { return float64(st.Counts().Devices) }),
		gauge("outpost_store_dead_letters", "Dead letters kept.", func() float64 { return float64(st.Counts().DeadLetters) }),
		gauge("outpost_sync_backlog", "Outbox entries not yet acknowledged by the cloud.", func() float64 { return float64(st.Counts().OutboxBacklog) }),
	)
}
