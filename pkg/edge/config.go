// Package config reads the edge's configuration: built-in defaults, then a
// YAML file, then command-line flags, each overriding the one before.
package config

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/outpost-edge/outpost/pkg/ident"
)

// Edge is the edge daemon's configuration.
type Edge struct {
	ID        string   `yaml:"id"`
	DataDir   string   `yaml:"data"`
	HTTP      string   `yaml:"http"`
	Region    string   `yaml:"region"`
	Location  string   `yaml:"location"` // "lat,lng"
	Advertise string   `yaml:"advertise"`
	Admins    []string `yaml:"admins"`
	DevLogin  bool     `yaml:"dev_login"`
	LogLevel  string   `yaml:"log_level"`
	// Pprof serves net/http/pprof on this address when set (keep it on
	// loopback or an admin network).
	Pprof string `yaml:"pprof"`
	// MemoryLimitMB is a soft limit for the Go heap (runtime/debug.
	// SetMemoryLimit): above it the collector runs more often. 0 leaves the
	// runtime default; the GOMEMLIMIT environment variable wins over both.
	MemoryLimitMB int64 `yaml:"memory_limit_mb"`
	// ShutdownGrace bounds a graceful stop (SIGTERM/SIGINT): HTTP drain,
	// MQTT batches, syncer flush and closing the stores. Past it the process
	// exits non-zero.
	ShutdownGrace time.Duration `yaml:"shutdown_grace"`

	MQTT   MQTT   `yaml:"mqtt"`
	Cloud  Cloud  `yaml:"cloud"`
	Ingest Ingest `yaml:"ingest"`
	Auth   Auth   `yaml:"auth"`
	API    API    `yaml:"api"`
	Policy Policy `yaml:"policy"`
	WeChat WeChat `yaml:"wechat"`

	// Set by flags only, for tests and benchmarks.
	UnsafeNoSync          bool `yaml:"-"`
	UnsafeAckBeforeCommit bool `yaml:"-"`
	// UnsafeClockOffset shifts this edge's HLC wall clock (TESTING ONLY:
	// simulates a skewed clock for the clock-safety fault test).
	UnsafeClockOffset time.Duration `yaml:"-"`
	// UnsafeCrashAfterPush makes the syncer SIGKILL the process after that
	// many acknowledged pushes, before recording the ack (TESTING ONLY).
	UnsafeCrashAfterPush int `yaml:"-"`
}

// MQTT configures the embedded broker or the external one.
type MQTT struct {
	Listen   string `yaml:"listen"`
	Broker   string `yaml:"broker"`    // external broker URL; empty = embedded
	ClientID string `yaml:"client_id"` // external mode; default outpost-{id}
	Username string `yaml:"username"`
	Password string `yaml:"password"`
	// Devices maps device id to a bcrypt hash of its password (embedded
	// broker). Empty means open access.
	Devices map[string]string `yaml:"devices"`
}

// Cloud configures the link to cloud-sync.
type Cloud struct {
	URLs  []string `yaml:"urls"`
	Token string   `yaml:"token"`
	// MaxClockDrift: remote HLC stamps further ahead than this are rejected
	// (default 5m).
	MaxClockDrift time.Duration `yaml:"max_clock_drift"`
	// MaxOffline is the longest offline window the deployment supports
	// (tombstones are kept at least this long); an edge offline longer gets
	// a full resync (default 720h).
	MaxOffline time.Duration `yaml:"max_offline"`
	// BatchReadings is the target number of readings per push (default
	// 20000).
	BatchReadings int `yaml:"batch_readings"`
	// BackoffMax caps the full-jitter backoff between failed exchanges
	// (default 30s).
	BackoffMax time.Duration `yaml:"backoff_max"`
}

// Ingest tunes the write path.
type Ingest struct {
	MaxBatch       int           `yaml:"max_batch"`
	Linger         time.Duration `yaml:"linger"`
	QuotaMB        int64         `yaml:"quota_mb"`
	MinFreeMB      int64         `yaml:"min_free_mb"`
	Retention      time.Duration `yaml:"retention"`
	MaxDeadLetters int           `yaml:"max_dead_letters"`
}

// Auth configures tokens.
type Auth struct {
	AccessTTL  time.Duration `yaml:"access_ttl"`
	RefreshTTL time.Duration `yaml:"refresh_ttl"`
	// KeyRotation is how long a signing key signs before it is replaced
	// (old keys verify until their tokens expire); negative disables.
	KeyRotation time.Duration `yaml:"key_rotation"`
}

// API hardens the HTTP server.
type API struct {
	BodyLimitKB      int     `yaml:"body_limit_kb"`
	RateLimitPerIP   float64 `yaml:"rate_limit_per_ip"`
	RateLimitPerUser float64 `yaml:"rate_limit_per_user"`
	BypassPolicy     bool    `yaml:"-"`
}

// Policy locates the Rego policies.
type Policy struct {
	Dir string `yaml:"dir"`
}

// WeChat holds the mini-program credentials for code2session.
type WeChat struct {
	AppID   string `yaml:"appid"`
	Secret  string `yaml:"secret"`
	APIBase string `yaml:"api_base"`
}

// DefaultEdge is the configuration with nothing set.
func DefaultEdge() Edge {
	return Edge{
		ID:            hostnameOr("edge-1"),
		DataDir:       "./data",
		HTTP:          ":8080",
		Region:        "default",
		LogLevel:      "info",
		MQTT:          MQTT{Listen: ":1883"},
		ShutdownGrace: 10 * time.Second,
		Ingest: Ingest{
			MaxBatch: 1000, QuotaMB: 0, MinFreeMB: 256, Retention: 30 * 24 * time.Hour, MaxDeadLetters: 10000,
		},
		Auth:   Auth{AccessTTL: 15 * time.Minute, RefreshTTL: 30 * 24 * time.Hour, KeyRotation: 30 * 24 * time.Hour},
		API:    API{BodyLimitKB: 64, RateLimitPerIP: 200, RateLimitPerUser: 100},
		Policy: Policy{Dir: "./policies"},
		WeChat: WeChat{APIBase: "https://api.weixin.qq.com"},
	}
}

func hostnameOr(def string) string {
	h, err := os.Hostname()
	if err != nil || h == "" {
		return def
	}
	return h
}

// ErrHelp is returned when -h was given; usage has been printed.
var ErrHelp = flag.ErrHelp

// ParseEdge reads defaults, the -config file and the flags in args. Flags are
// parsed twice: once to learn -config, then, after the file is loaded, again
// writing straight into the configuration, so only flags actually given
// override the file.
func ParseEdge(args []string, stderr io.Writer) (Edge, error) {
	cfg := DefaultEdge()
	var path string
	scratch := cfg
	if err := edgeFlags(&scratch, &path, io.Discard).Parse(args); err != nil {
		// Parse again with output, so -h prints usage and errors show as usual.
		again := DefaultEdge()
		return cfg, edgeFlags(&again, new(string), stderr).Parse(args)
	}
	if path != "" {
		if err := loadYAML(path, &cfg); err != nil {
			return cfg, err
		}
	}
	fs := edgeFlags(&cfg, &path, stderr)
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	return cfg, cfg.Validate()
}

// edgeFlags defines the edge's flags bound to cfg, with cfg's values as
// defaults.
func edgeFlags(cfg *Edge, path *string, out io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("edge", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(path, "config", *path, "YAML config file (see configs/edge.yaml); flags override it")
	fs.StringVar(&cfg.ID, "id", cfg.ID, "edge id, unique in the deployment")
	fs.StringVar(&cfg.DataDir, "data", cfg.DataDir, "data directory (bbolt files, keys)")
	fs.StringVar(&cfg.HTTP, "http", cfg.HTTP, "HTTP API listen address")
	fs.StringVar(&cfg.MQTT.Listen, "mqtt-listen", cfg.MQTT.Listen, "embedded MQTT broker listen address")
	fs.StringVar(&cfg.MQTT.Broker, "mqtt-broker", cfg.MQTT.Broker, "external MQTT broker URL (tcp://host:port); disables the embedded broker")
	fs.Func("cloud", "cloud-sync URL(s), comma separated", func(v string) error { cfg.Cloud.URLs = splitList(v); return nil })
	fs.StringVar(&cfg.Cloud.Token, "cloud-token", cfg.Cloud.Token, "this edge's credential at cloud-sync")
	fs.StringVar(&cfg.Region, "region", cfg.Region, "region this edge serves")
	fs.StringVar(&cfg.Location, "location", cfg.Location, "edge location as LAT,LNG in degrees")
	fs.StringVar(&cfg.Advertise, "advertise", cfg.Advertise, "URL at which phones reach this edge's API")
	fs.Func("admin", "openid(s) with the admin role on this edge, comma separated", func(v string) error { cfg.Admins = splitList(v); return nil })
	fs.BoolVar(&cfg.DevLogin, "dev-login", cfg.DevLogin, `accept login code "dev:<openid>" without WeChat (development only)`)
	fs.StringVar(&cfg.LogLevel, "log-level", cfg.LogLevel, "log level: debug, info, warn, error")
	fs.StringVar(&cfg.Pprof, "pprof", cfg.Pprof, "admin address for pprof and the runtime log level, e.g. 127.0.0.1:6060 (off by default; unauthenticated)")
	fs.DurationVar(&cfg.ShutdownGrace, "shutdown-grace", cfg.ShutdownGrace, "on SIGTERM/SIGINT, time allowed to drain requests and MQTT batches, flush and close before exiting non-zero")
	fs.StringVar(&cfg.Policy.Dir, "policies", cfg.Policy.Dir, "directory of Rego policies")
	fs.DurationVar(&cfg.Cloud.BackoffMax, "cloud-backoff-max", cfg.Cloud.BackoffMax, "cap of the jittered backoff between failed cloud exchanges (0: 30s)")
	fs.IntVar(&cfg.Cloud.BatchReadings, "cloud-batch-readings", cfg.Cloud.BatchReadings, "target readings per sync push (0: 20000)")
	fs.BoolVar(&cfg.UnsafeNoSync, "unsafe-no-fsync", false, "TESTING ONLY: disable fsync")
	fs.IntVar(&cfg.UnsafeCrashAfterPush, "unsafe-crash-after-push", 0, "TESTING ONLY: kill -9 the edge after N pushes the cloud acknowledged, before recording the ack")
	fs.DurationVar(&cfg.UnsafeClockOffset, "unsafe-clock-offset", 0, "TESTING ONLY: shift this edge's HLC wall clock by this much (simulates a skewed clock)")
	fs.BoolVar(&cfg.UnsafeAckBeforeCommit, "unsafe-ack-before-commit", false, "TESTING ONLY: acknowledge messages before they are durable (proves crash tests detect loss)")
	fs.BoolVar(&cfg.API.BypassPolicy, "unsafe-bypass-policy", false, "BENCHMARK ONLY: skip policy checks")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: edge [flags]\n\nOutpost edge gateway: embedded MQTT broker, durable ingest, HTTP API.\nFlags override the config file, which overrides built-in defaults.\n\n")
		fs.PrintDefaults()
	}
	return fs
}

func loadYAML(path string, into any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read config: %w", err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true) // a misspelt key is an error, not a silent default
	if err := dec.Decode(into); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("config %s: %w", path, err)
	}
	return nil
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// ParseLocation reads "lat,lng"; ok is false when s is empty.
func ParseLocation(s string) (lat, lng float64, ok bool, err error) {
	if strings.TrimSpace(s) == "" {
		return 0, 0, false, nil
	}
	a, b, found := strings.Cut(s, ",")
	if !found {
		return 0, 0, false, fmt.Errorf("location %q: want LAT,LNG", s)
	}
	lat, err1 := strconv.ParseFloat(strings.TrimSpace(a), 64)
	lng, err2 := strconv.ParseFloat(strings.TrimSpace(b), 64)
	if err1 != nil || err2 != nil || lat < -90 || lat > 90 || lng < -180 || lng > 180 {
		return 0, 0, false, fmt.Errorf("location %q: want LAT,LNG in degrees (-90..90, -180..180)", s)
	}
	return lat, lng, true, nil
}

// Validate reports the first thing wrong with c, in words an operator can act on.
func (c *Edge) Validate() error {
	var errs []error
	if !ident.DeviceID(c.ID) {
		errs = append(errs, fmt.Errorf("id %q must match [A-Za-z0-9._-]{1,64}", c.ID))
	}
	if c.DataDir == "" {
		errs = append(errs, errors.New("data directory must be set"))
	}
	if c.HTTP == "" {
		errs = append(errs, errors.New("http address must be set"))
	}
	if c.MQTT.Broker == "" && c.MQTT.Listen == "" {
		errs = append(errs, errors.New("either mqtt.listen (embedded broker) or mqtt.broker (external) must be set"))
	}
	if c.MQTT.Broker != "" && !strings.Contains(c.MQTT.Broker, "://") {
		errs = append(errs, fmt.Errorf("mqtt broker %q must be a URL like tcp://host:1883", c.MQTT.Broker))
	}
	if _, _, _, err := ParseLocation(c.Location); err != nil {
		errs = append(errs, err)
	}
	for dev, hash := range c.MQTT.Devices {
		if !ident.DeviceID(dev) {
			errs = append(errs, fmt.Errorf("mqtt.devices: device id %q must match [A-Za-z0-9._-]{1,64}", dev))
		}
		if !strings.HasPrefix(hash, "$2") {
			errs = append(errs, fmt.Errorf("mqtt.devices.%s: password must be a bcrypt hash (generate one with: edge hash-password)", dev))
		}
	}
	if len(c.Cloud.URLs) > 0 && c.Cloud.Token == "" {
		errs = append(errs, errors.New("cloud URLs are set but cloud token is empty"))
	}
	if c.Ingest.MaxBatch < 1 || c.Ingest.MaxBatch > 100000 {
		errs = append(errs, fmt.Errorf("ingest.max_batch %d must be 1..100000", c.Ingest.MaxBatch))
	}
	if c.Ingest.Linger < 0 || c.Ingest.Linger > time.Second {
		errs = append(errs, fmt.Errorf("ingest.linger %s must be 0..1s", c.Ingest.Linger))
	}
	if c.ShutdownGrace <= 0 {
		errs = append(errs, fmt.Errorf("shutdown_grace %s must be positive", c.ShutdownGrace))
	}
	if c.Ingest.Retention < 0 {
		errs = append(errs, errors.New("ingest.retention must not be negative"))
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("log level %q must be debug, info, warn or error", c.LogLevel))
	}
	if c.UnsafeAckBeforeCommit && !c.UnsafeNoSync {
		c.UnsafeNoSync = true
	}
	return errors.Join(errs...)
}
