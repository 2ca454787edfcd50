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
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"golang.org/x/crypto/bcrypt"
	"golang.org/x/sys/unix"

	"github.com/outpost-edge/outpost/pkg/api"
	"github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/auth/federation"
	"github.com/outpost-edge/outpost/pkg/broker"
	"github.com/outpost-edge/outpost/pkg/config"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/ingest"
	"github.com/outpost-edge/outpost/pkg/obs"
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
	log, level, err := obs.NewLogger(os.Stderr, cfg.LogLevel)
	if err != nil {
		fmt.Fprintf(os.Stderr, "edge: %v\n", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, log, level); err != nil {
		log.Error("edge stopped", "err", err)
		fmt.Fprintf(os.Stderr, "edge: %v\n", err)
		os.Exit(1)
	}
}

// hashPassword reads a device password on stdin and prints its bcrypt hash
// for mqtt.devices in the config.
func hashPassword() int {
	line, err := bufio.NewReader(os.Stdin).ReadString('\n')
	if err != nil && line == "" {
		fmt.Fprintln(os.Stderr, "edge hash-password: type the password on stdin")
		return 2
	}
	h, err := bcrypt.GenerateFromPassword([]byte(strings.TrimRight(line, "\r\n")), bcrypt.DefaultCost)
	if err != nil {
		fmt.Fprintf(os.Stderr, "edge hash-password: %v\n", err)
		return 1
	}
	fmt.Fprintln(os.Stdout, string(h))
	return 0
}

func run(ctx context.Context, cfg config.Edge, log *slog.Logger, level *slog.LevelVar) error {
	if cfg.MemoryLimitMB > 0 && os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(cfg.MemoryLimitMB << 20)
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("create data dir: %w", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	obs.RegisterBuildInfo(reg, "edge")

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
		Issuer: cfg.ID, AccessTTL: cfg.Auth.AccessTTL, RefreshTTL: cfg.Auth.RefreshTTL,
		KeyRotation: cfg.Auth.KeyRotation, Logger: log,
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
	writerDone := make(chan struct{})
	go func() { defer close(writerDone); _ = writer.Run(writerCtx) }()
	defer func() { stopWriter(); <-writerDone }()

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
		var id *federation.Identity
		if sy, id, err = newSyncer(cfg, now, st, tokens, login, downlink, engine, engine.InvalidateData, reg, log); err != nil {
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

	adminAddr := ""
	if cfg.Pprof != "" {
		admin, err := obs.ListenAdmin(cfg.Pprof, level, log)
		if err != nil {
			return err
		}
		adminAddr = admin.Addr()
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := admin.Run(bgCtx); err != nil {
				log.Error("admin listener", "err", err)
			}
		}()
	}

	log.Info("outpost edge started", "id", cfg.ID, "http", httpLn.Addr().String(), "mqtt", mqttAddr,
		"embedded_broker", cfg.MQTT.Broker == "", "data", cfg.DataDir, "dev_login", cfg.DevLogin, "admin", adminAddr)

	var runErr error
	select {
	case <-ctx.Done():
		log.Info("shutting down", "grace", cfg.ShutdownGrace)
	case runErr = <-errc:
	}
	return shutdown(cfg.ShutdownGrace, log, runErr, shutdownSteps{
		http: srv.Shutdown,
		mqtt: func() error {
			stopSub()
			if brk != nil {
				return brk.Close()
			}
			return nil
		},
		writer: func() { stopWriter(); <-writerDone },
		// Push what the outbox holds, bounded by the grace period, after the
		// writer committed its last batch and before the store closes.
		syncer: syncFlush(sy),
		rest:   func() { stopBg(); wg.Wait() },
		store:  st.Close,
	})
}

// shutdownSteps are the edge's parts in the order they stop.
type shutdownSteps struct {
	http   func(context.Context) error // stop accepting; drain in-flight requests
	mqtt   func() error                // stop accepting; close device connections
	writer func()                      // commit and ack what the writer holds
	syncer func(context.Context) error // push the outbox to the cloud (optional)
	rest   func()                      // background loops; waits for every goroutine
	store  func() error                // close bbolt
}

// shutdown stops the edge within grace, in an order that loses nothing:
//
//  1. HTTP stops accepting and in-flight API requests finish (their writes
//     are durable and their downlinks go out through the broker, which is
//     still up);
//  2. MQTT stops accepting and device connections close; publishes not yet
//     committed are released unacknowledged, so devices resend them;
//  3. the writer commits and acknowledges the batches it holds;
//  4. the syncer flushes to the cloud, best effort within the grace;
//  5. background loops stop, then the store (bbolt) closes.
//
// Past the grace the process exits 1 instead of hanging its supervisor:
// bbolt and the broker state are crash-safe, so nothing acknowledged is lost
// either way.
func shutdown(grace time.Duration, log *slog.Logger, runErr error, s shutdownSteps) error {
	start := time.Now()
	watchdog := time.AfterFunc(grace, func() {
		log.Error("shutdown did not finish within the grace period; exiting", "grace", grace)
		os.Exit(1)
	})
	defer watchdog.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	var errs []error
	if err := s.http(ctx); err != nil {
		errs = append(errs, fmt.Errorf("http drain: %w", err))
	}
	if err := s.mqtt(); err != nil {
		errs = append(errs, fmt.Errorf("mqtt close: %w", err))
	}
	s.writer()
	if s.syncer != nil {
		if err := s.syncer(ctx); err != nil {
			log.Warn("syncer flush incomplete; the outbox keeps the rest for next start", "err", err)
		}
	}
	s.rest()
	if err := s.store(); err != nil {
		errs = append(errs, fmt.Errorf("close store: %w", err))
	}
	if runErr != nil {
		return runErr
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	log.Info("edge stopped cleanly", "took", time.Since(start).Round(time.Millisecond))
	return nil
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
