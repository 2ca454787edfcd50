// Command edge is the Outpost edge gateway: an MQTT broker (embedded, or an
// external one), durable ingest into bbolt, and the mini-program HTTP API.
package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"golang.org/x/crypto/bcrypt"
	"golang.org/x/sys/unix"

	"github.com/outpost-edge/outpost/pkg/api"
	"github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/broker"
	"github.com/outpost-edge/outpost/pkg/config"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/ingest"
	"github.com/outpost-edge/outpost/pkg/policy"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/syncer"
	"github.com/outpost-edge/outpost/pkg/wechat"
	"github.com/outpost-edge/outpost/policies"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "hash-password" {
		os.Exit(hashPassword())
	}
	cfg, err := config.ParseEdge(os.Args[1:], os.Stderr)
	if errors.Is(err, config.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "edge: %v\n", err)
		os.Exit(2)
	}
	log := newLogger(cfg.LogLevel)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, log); err != nil {
		log.Error("edge stopped", "err", err)
		fmt.Fprintf(os.Stderr, "edge: %v\n", err)
		os.Exit(1)
	}
}

func newLogger(level string) *slog.Logger {
	var l slog.Level
	_ = l.UnmarshalText([]byte(level))
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: l}))
}

// hashPassword reads a device password on stdin and prints its bcrypt hash
// for mqtt.devices in the config.
func hashPassword() int {
	line, err := bufio.NewReader(os.Stdin).ReadString('\n')
	if err != nil && line == "" {
		fmt.Fprintln(os.Stderr, "edge hash-password: type the password on stdin")
		return 2
	}
	h, err := bcrypt.GenerateFromPassword([]byte(trimNewline(line)), bcrypt.DefaultCost)
	if err != nil {
		fmt.Fprintf(os.Stderr, "edge hash-password: %v\n", err)
		return 1
	}
	fmt.Fprintln(os.Stdout, string(h))
	return 0
}

func trimNewline(s string) string {
	for len(s) > 0 && (s[len(s)-1] == '\n' || s[len(s)-1] == '\r') {
		s = s[:len(s)-1]
	}
	return s
}

func run(ctx context.Context, cfg config.Edge, log *slog.Logger) error {
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("create data dir: %w", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	// Listen first, so a busy port fails fast before anything is opened.
	httpLn, err := net.Listen("tcp", cfg.HTTP)
	if err != nil {
		return fmt.Errorf("http listen %s: %w", cfg.HTTP, err)
	}
	defer httpLn.Close()

	drift := cfg.Cloud.MaxClockDrift
	if drift <= 0 {
		drift = 5 * time.Minute
	}
	var now func() time.Time
	if off := cfg.UnsafeClockOffset; off != 0 {
		log.Warn("TESTING ONLY: HLC wall clock shifted", "offset", off)
		now = func() time.Time { return time.Now().Add(off) }
	}
	clock := hlc.NewClock(now, drift)
	st, err := store.Open(filepath.Join(cfg.DataDir, "edge.db"), store.Options{
		EdgeID: cfg.ID, Region: cfg.Region, Clock: clock,
		MaxDeadLetters: cfg.Ingest.MaxDeadLetters, NoSync: cfg.UnsafeNoSync,
	})
	if err != nil {
		return err
	}
	defer st.Close()
	registerStoreMetrics(reg, st)

	keys, err := auth.OpenKeyring(filepath.Join(cfg.DataDir, "keys"), nil)
	if err != nil {
		return fmt.Errorf("open keyring: %w", err)
	}
	tokens, err := auth.NewService(keys, st.DB(), auth.Config{
		Issuer: cfg.ID, AccessTTL: cfg.Auth.AccessTTL, RefreshTTL: cfg.Auth.RefreshTTL, Logger: log,
	})
	if err != nil {
		return fmt.Errorf("auth: %w", err)
	}

	policyDir, err := policies.Dir(cfg.Policy.Dir, filepath.Join(cfg.DataDir, "policies"))
	if err != nil {
		return err
	}
	if policyDir != cfg.Policy.Dir {
		log.Warn("policy directory not found; using the built-in policies", "wanted", cfg.Policy.Dir, "using", policyDir)
	}
	joined := len(cfg.Cloud.URLs) > 0
	if joined {
		if policyDir, err = cloudPolicyDir(policyDir, cfg.DataDir); err != nil {
			return err
		}
	}
	engine, err := policy.New(ctx, policy.Config{Dir: policyDir, Registerer: reg, Logger: log, Bypass: false})
	if err != nil {
		return fmt.Errorf("load policies from %s: %w", policyDir, err)
	}

	writer := ingest.NewWriter(st, ingest.NewDecoder(ingest.DefaultLimits), ingest.Config{
		MaxBatch: cfg.Ingest.MaxBatch, Linger: cfg.Ingest.Linger,
		QuotaBytes: cfg.Ingest.QuotaMB << 20, MinFreeBytes: cfg.Ingest.MinFreeMB << 20,
		FreeBytes:             func() (int64, error) { return freeBytes(cfg.DataDir) },
		UnsafeAckBeforeCommit: cfg.UnsafeAckBeforeCommit,
	}, reg, log.With("component", "ingest"))

	var login api.Login
	if cfg.WeChat.AppID != "" {
		wc, err := wechat.New(wechat.Config{AppID: cfg.WeChat.AppID, Secret: cfg.WeChat.Secret, APIBase: cfg.WeChat.APIBase})
		if err != nil {
			return fmt.Errorf("wechat: %w", err)
		}
		login = api.WeChatLogin{Client: wc, Tokens: tokens}
	}
	var loc *api.Location
	if lat, lng, ok, _ := config.ParseLocation(cfg.Location); ok {
		loc = &api.Location{Lat: lat, Lng: lng}
	}

	// Goroutines below are owned by run: each stops when its context ends,
	// and run waits for all of them before closing the store.
	var wg sync.WaitGroup
	errc := make(chan error, 4)
	writerCtx, stopWriter := context.WithCancel(context.Background())
	defer stopWriter()
	wg.Add(1)
	go func() { defer wg.Done(); _ = writer.Run(writerCtx) }()

	var downlink api.Downlink
	var brk *broker.Broker
	var mqttAddr string
	subCtx, stopSub := context.WithCancel(context.Background())
	defer stopSub()
	if cfg.MQTT.Broker == "" {
		brk, err = broker.New(broker.Config{
			Listen: cfg.MQTT.Listen, StatePath: filepath.Join(cfg.DataDir, "broker.db"),
			Credentials: cfg.MQTT.Devices, Logger: log,
		}, writer)
		if err != nil {
			return err
		}
		if err := brk.Start(); err != nil {
			brk.Close()
			return err
		}
		if len(cfg.MQTT.Devices) == 0 {
			log.Warn("embedded MQTT broker is open: any client may connect and publish (set mqtt.devices for production)")
		}
		downlink, mqttAddr = brk, brk.Addr()
	} else {
		clientID := cfg.MQTT.ClientID
		if clientID == "" {
			clientID = "outpost-" + cfg.ID
		}
		sub := ingest.NewSubscriber(ingest.SubscriberConfig{
			BrokerURL: cfg.MQTT.Broker, ClientID: clientID, Username: cfg.MQTT.Username, Password: cfg.MQTT.Password,
			Logger: log.With("component", "mqtt"),
		}, writer)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := sub.Run(subCtx); err != nil {
				errc <- err
			}
		}()
		downlink, mqttAddr = sub, cfg.MQTT.Broker
	}

	// A joined edge syncs with the cloud and logs users in through it.
	var sy *syncer.Syncer
	var apiTokens api.Tokens = tokens
	var syncStatus api.SyncStatus
	var directory api.Directory
	if joined {
		var id *syncer.Identity
		if sy, id, err = newSyncer(cfg, now, st, tokens, login, downlink, policyDir, engine.InvalidateData, reg, log); err != nil {
			return err
		}
		apiTokens, login, syncStatus, directory = id, id, sy, sy
	}

	srv, err := api.New(api.Config{
		EdgeID: cfg.ID, Region: cfg.Region, Location: loc, Advertise: cfg.Advertise,
		Admins: cfg.Admins, DevLogin: cfg.DevLogin, BodyLimit: cfg.API.BodyLimitKB << 10,
		RateLimitPerIP: cfg.API.RateLimitPerIP, RateLimitPerUser: cfg.API.RateLimitPerUser,
		BypassPolicy: cfg.API.BypassPolicy, Logger: log.With("component", "api"),
	}, api.Deps{
		Store: st, Tokens: apiTokens, Login: login, Policy: engine, Downlink: downlink,
		Sync: syncStatus, Directory: directory,
		Ready: func() string {
			if writer.Backpressure() {
				return "disk quota reached: ingest is applying backpressure"
			}
			return ""
		},
		Registerer: reg, Gatherer: reg, DataChanged: engine.InvalidateData,
	})
	if err != nil {
		return err
	}

	bgCtx, stopBg := context.WithCancel(ctx)
	defer stopBg()
	wg.Add(4)
	go func() { defer wg.Done(); srv.Run(bgCtx) }()
	go func() { defer wg.Done(); _ = engine.Run(bgCtx) }()
	go func() { defer wg.Done(); _ = tokens.Run(bgCtx) }()
	go func() { defer wg.Done(); retain(bgCtx, st, cfg, log) }()
	if sy != nil {
		wg.Add(1)
		go func() { defer wg.Done(); _ = sy.Run(bgCtx) }()
	}
	go func() {
		if err := srv.Serve(httpLn); err != nil {
			errc <- err
		}
	}()

	if cfg.Pprof != "" {
		stopPprof, err := servePprof(cfg.Pprof, log)
		if err != nil {
			return err
		}
		defer stopPprof()
	}

	log.Info("outpost edge started", "id", cfg.ID, "http", httpLn.Addr().String(), "mqtt", mqttAddr,
		"embedded_broker", cfg.MQTT.Broker == "", "data", cfg.DataDir, "dev_login", cfg.DevLogin)

	var runErr error
	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case runErr = <-errc:
	}

	// Stop accepting and drain in order: HTTP requests, device connections
	// (blocked publishes are released unacknowledged), then the writer
	// commits what it holds, and only then the store closes.
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		log.Warn("http shutdown", "err", err)
	}
	if brk != nil {
		if err := brk.Close(); err != nil {
			log.Warn("mqtt shutdown", "err", err)
		}
	}
	stopSub()
	stopBg()
	stopWriter()
	wg.Wait()
	log.Info("edge stopped cleanly")
	return runErr
}

// retain prunes readings past the retention period that the cloud already
// holds. A standalone edge has no cloud, so its outbox is acknowledged
// locally first; an edge with a cloud keeps everything unsynced.
func retain(ctx context.Context, st *store.Store, cfg config.Edge, log *slog.Logger) {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		if len(cfg.Cloud.URLs) == 0 {
			if c := st.Counts(); c.OutboxBacklog > 0 {
				if err := st.AckOutbox(c.OutboxHead); err != nil {
					log.Error("trim outbox", "err", err)
				}
			}
		}
		if cfg.Ingest.Retention > 0 {
			cutoff := time.Now().Add(-cfg.Ingest.Retention).UnixMilli()
			res, err := st.Prune(ctx, cutoff)
			if err != nil && ctx.Err() == nil {
				log.Error("retention", "err", err)
			} else if res.Deleted > 0 || res.Unsynced > 0 {
				log.Info("retention", "deleted", res.Deleted, "kept_unsynced", res.Unsynced)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
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

// servePprof serves the profiler on its own listener, apart from the API.
func servePprof(addr string, log *slog.Logger) (func(), error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("pprof listen %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("pprof", "err", err)
		}
	}()
	log.Info("pprof listening", "addr", ln.Addr().String())
	return func() { srv.Close() }, nil
}
