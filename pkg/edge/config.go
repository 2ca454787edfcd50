package edge

import (
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/outpost-edge/outpost/pkg/api"
	"github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/broker"
	"github.com/outpost-edge/outpost/pkg/config"
	"github.com/outpost-edge/outpost/pkg/httpguard"
	"github.com/outpost-edge/outpost/pkg/ident"
	"github.com/outpost-edge/outpost/pkg/ingest"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/syncer"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Config is the edge daemon's configuration: built-in defaults, then a YAML
// file, then command-line flags, each overriding the one before. YAML keys
// are the snake_case names; configs/edge.yaml documents every key.
type Config struct {
	// Development marks a development configuration (configs/dev/): it
	// may hold a placeholder or short cloud token, and every convenience in
	// force is announced at start-up. Outside it those are refused.
	Development bool `yaml:"development"`

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
	// GCPercent sets the collector's target (runtime/debug.SetGCPercent,
	// what GOGC sets): 0 leaves the runtime default (100); the GOGC
	// environment variable wins over both.
	GCPercent int `yaml:"gc_percent"`
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
	// UnsafeCrashAfterPush makes the edge SIGKILL itself after that many
	// pushes the cloud acknowledged, before the syncer records the ack
	// (TESTING ONLY; installed as the syncer's AfterAck hook).
	UnsafeCrashAfterPush int `yaml:"-"`
	// phoneRecheck replaces the broker's periodic re-check of phones
	// (0: its default): tests set it long, to show that a change is
	// re-checked at once rather than at the next period.
	phoneRecheck time.Duration

	// CheckConfig (-check-config) asks main to validate and print the
	// effective configuration instead of running.
	CheckConfig bool `yaml:"-"`

	// fileNotices are the warnings reading credential files raised.
	fileNotices []config.Notice
}

// MQTT configures the embedded broker or the external one.
type MQTT struct {
	Listen   string `yaml:"listen"`
	Broker   string `yaml:"broker"`    // external broker URL; empty = embedded
	ClientID string `yaml:"client_id"` // external mode; default outpost-{id}
	Username string `yaml:"username"`
	Password string `yaml:"password"`
	// Devices maps device id to a bcrypt hash of its password (embedded
	// broker). Empty means an open broker: see AllowAnonymous.
	Devices map[string]string `yaml:"devices"`
	// AllowAnonymous opens an embedded broker without device credentials
	// to every address (development); without it such a broker accepts
	// loopback clients only.
	AllowAnonymous bool `yaml:"allow_anonymous"`
	// ConnectTimeout: a connection must complete CONNECT within it.
	ConnectTimeout time.Duration `yaml:"connect_timeout"`
	// MaxConnections caps the embedded broker's open connections.
	MaxConnections int `yaml:"max_connections"`
	// LiveInterval: phones at /mqtt get each sensors/ topic's messages at
	// most this often, the latest of those in between
	// (broker.Config.LiveInterval).
	LiveInterval time.Duration `yaml:"live_interval"`
}

// Cloud configures the link to cloud-sync.
type Cloud struct {
	URLs  []string `yaml:"urls"`
	Token string   `yaml:"token"`
	// TokenFile holds the token instead (keeps it out of the config file
	// and argv; a mounted Secret).
	TokenFile string `yaml:"token_file"`
	// CA is a PEM bundle to trust for https:// cloud URLs (a private CA);
	// empty: the system's roots.
	CA string `yaml:"ca"`
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
	// RefreshReuseGrace is how long a retry of a refresh with the same
	// token gets the same new pair (a lost answer) rather than revoking
	// the session; negative disables. Local sessions only: a joined edge's
	// cloud sessions follow the cloud's setting.
	RefreshReuseGrace time.Duration `yaml:"refresh_reuse_grace"`
}

// API hardens the HTTP server.
type API struct {
	BodyLimitKB      int     `yaml:"body_limit_kb"`
	RateLimitPerIP   float64 `yaml:"rate_limit_per_ip"`
	RateLimitPerUser float64 `yaml:"rate_limit_per_user"`
	// TrustedProxies are the IPs or CIDRs of the proxies (TLS terminators)
	// whose X-Forwarded-For names the client; empty: the peer is the
	// client. MaxConns and MaxConnsPerIP cap open connections, in total
	// and per address (trusted proxies exempt).
	TrustedProxies []string `yaml:"trusted_proxies"`
	MaxConns       int      `yaml:"max_conns"`
	MaxConnsPerIP  int      `yaml:"max_conns_per_ip"`
	// OnlineWindow: with an external broker (whose connections the edge
	// cannot see) a device is "online" if seen this recently.
	OnlineWindow time.Duration `yaml:"online_window"`
	BypassPolicy bool          `yaml:"-"`
}

// Policy locates the Rego policies.
type Policy struct {
	Dir string `yaml:"dir"`
}

// WeChat holds the mini-program credentials for code2session.
type WeChat struct {
	AppID      string `yaml:"appid"`
	Secret     string `yaml:"secret"`
	SecretFile string `yaml:"secret_file"`
	APIBase    string `yaml:"api_base"`
}

// Credentials come from these environment variables when no flag gives
// them (they win over the config file), so they need not be in argv.
const (
	EnvCloudToken   = "OUTPOST_CLOUD_TOKEN"
	EnvWeChatSecret = "OUTPOST_WECHAT_SECRET"
)

// DefaultConfig is the configuration with nothing set. What a component
// owns comes from that component's defaults (ingest.DefaultConfig,
// store.DefaultOptions, syncer.DefaultConfig, api.DefaultConfig, auth's
// Default*), so each default has one source; the rest are the daemon's own
// choices (the API's rate limits, off in pkg/api, are on at the edge).
func DefaultConfig() Config {
	in, st, sy, br, ad := ingest.DefaultConfig(), store.DefaultOptions(), syncer.DefaultConfig(), broker.DefaultConfig(), api.DefaultConfig()
	return Config{
		ID:            hostnameOr("edge-1"),
		DataDir:       "./data",
		HTTP:          ":8080",
		Region:        "default",
		LogLevel:      "info",
		MQTT:          MQTT{Listen: br.Listen, ConnectTimeout: br.ConnectTimeout, MaxConnections: br.MaxConnections, LiveInterval: br.LiveInterval},
		ShutdownGrace: 10 * time.Second,
		// No soft heap limit unless asked: the right one depends on the
		// device's memory, which the runtime cannot know (deployments pass
		// GOMEMLIMIT from the container's limit instead).
		MemoryLimitMB: 0,
		// Ingest's garbage is mostly bbolt's copies of the pages each
		// commit touches; a collector target of 200 cut their CPU by about
		// a fifth (store BenchmarkIngestCPU) for 15-20 MiB more heap.
		GCPercent: 200,
		Cloud: Cloud{
			MaxClockDrift: DefaultMaxClockDrift, MaxOffline: sy.MaxOffline,
			BatchReadings: sy.BatchReadings, BackoffMax: sy.BackoffMax,
		},
		Ingest: Ingest{
			MaxBatch: in.MaxBatch, Linger: in.Linger, QuotaMB: in.QuotaBytes >> 20, MinFreeMB: 256,
			Retention: 30 * 24 * time.Hour, MaxDeadLetters: st.MaxDeadLetters,
		},
		Auth: Auth{AccessTTL: auth.DefaultAccessTTL, RefreshTTL: auth.DefaultRefreshTTL, KeyRotation: auth.DefaultKeyRotation, RefreshReuseGrace: auth.DefaultRefreshReuseGrace},
		API: API{BodyLimitKB: ad.BodyLimit >> 10, RateLimitPerIP: 200, RateLimitPerUser: 100,
			MaxConns: ad.MaxConns, MaxConnsPerIP: ad.MaxConnsPerIP, OnlineWindow: ad.OnlineWindow},
		Policy: Policy{Dir: "./policies"},
		WeChat: WeChat{APIBase: "https://api.weixin.qq.com"},
	}
}

// DefaultMaxClockDrift bounds how far ahead of this edge's clock a remote
// HLC stamp may be before it is rejected.
const DefaultMaxClockDrift = 5 * time.Minute

func hostnameOr(def string) string {
	h, err := os.Hostname()
	if err != nil || h == "" {
		return def
	}
	return h
}

// ErrHelp is returned when -h was given; usage has been printed.
var ErrHelp = flag.ErrHelp

// Parse reads defaults, the -config file and the flags in args. Flags are
// parsed twice: once to learn -config, then, after the file is loaded, again
// writing straight into the configuration, so only flags actually given
// override the file. Validation problems come back together, as
// config.Errors.
func Parse(args []string, stderr io.Writer) (Config, error) { return parse(args, stderr, os.Getenv) }

func parse(args []string, stderr io.Writer, getenv func(string) string) (Config, error) {
	cfg := DefaultConfig()
	var path string
	scratch := cfg
	if err := edgeFlags(&scratch, &path, io.Discard).Parse(args); err != nil {
		// Parse again with output, so -h prints usage and errors show as usual.
		again := DefaultConfig()
		return cfg, edgeFlags(&again, new(string), stderr).Parse(args)
	}
	if path != "" {
		if err := config.LoadYAML(path, &cfg); err != nil {
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
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	var errs config.Errors
	for _, c := range []config.Credential{
		{Key: "cloud.token", FlagName: "cloud-token", Env: EnvCloudToken, Value: &cfg.Cloud.Token, File: &cfg.Cloud.TokenFile,
			FlagValue: set["cloud-token"], FlagFile: set["cloud-token-file"]},
		{Key: "wechat.secret", FlagName: "wechat-secret", Env: EnvWeChatSecret, Value: &cfg.WeChat.Secret, File: &cfg.WeChat.SecretFile},
	} {
		c.Resolve(getenv, &errs, &cfg.fileNotices)
	}
	return cfg, cfg.validate(errs)
}

// edgeFlags defines the edge's flags bound to cfg, with cfg's values as
// defaults.
func edgeFlags(cfg *Config, path *string, out io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("edge", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(path, "config", *path, "YAML config file (see configs/edge.yaml); flags override it")
	fs.StringVar(&cfg.ID, "id", cfg.ID, "edge id, unique in the deployment")
	fs.StringVar(&cfg.DataDir, "data", cfg.DataDir, "data directory (bbolt files, keys)")
	fs.StringVar(&cfg.HTTP, "http", cfg.HTTP, "HTTP API listen address")
	fs.StringVar(&cfg.MQTT.Listen, "mqtt-listen", cfg.MQTT.Listen, "embedded MQTT broker listen address")
	fs.StringVar(&cfg.MQTT.Broker, "mqtt-broker", cfg.MQTT.Broker, "external MQTT broker URL (tcp://host:port); disables the embedded broker")
	fs.BoolVar(&cfg.MQTT.AllowAnonymous, "mqtt-allow-anonymous", cfg.MQTT.AllowAnonymous, "open the embedded broker without device credentials to every address (development; without it, loopback only)")
	fs.DurationVar(&cfg.MQTT.ConnectTimeout, "mqtt-connect-timeout", cfg.MQTT.ConnectTimeout, "embedded broker: time a connection has to send CONNECT")
	fs.IntVar(&cfg.MQTT.MaxConnections, "mqtt-max-connections", cfg.MQTT.MaxConnections, "embedded broker: cap on open connections")
	fs.DurationVar(&cfg.MQTT.LiveInterval, "mqtt-live-interval", cfg.MQTT.LiveInterval, "phones at /mqtt get each sensors/ topic's messages at most this often, the latest of those in between")
	fs.Func("cloud", "cloud-sync URL(s), comma separated", func(v string) error { cfg.Cloud.URLs = config.SplitList(v); return nil })
	fs.StringVar(&cfg.Cloud.Token, "cloud-token", cfg.Cloud.Token, "this edge's credential at cloud-sync (visible in ps: prefer -cloud-token-file or $"+EnvCloudToken+")")
	fs.StringVar(&cfg.Cloud.TokenFile, "cloud-token-file", cfg.Cloud.TokenFile, "read this edge's credential at cloud-sync from this file")
	fs.BoolVar(&cfg.Development, "development", cfg.Development, "development configuration: allow a placeholder or short cloud token, announce every development convenience (never in production)")
	fs.StringVar(&cfg.Cloud.CA, "cloud-ca", cfg.Cloud.CA, "PEM `file`: CA bundle to trust for https:// cloud URLs (default: the system's roots)")
	fs.StringVar(&cfg.Region, "region", cfg.Region, "region this edge serves")
	fs.StringVar(&cfg.Location, "location", cfg.Location, "edge location as LAT,LNG in degrees")
	fs.StringVar(&cfg.Advertise, "advertise", cfg.Advertise, "URL at which phones reach this edge's API")
	fs.Func("admin", "openid(s) with the admin role on this edge, comma separated", func(v string) error { cfg.Admins = config.SplitList(v); return nil })
	fs.BoolVar(&cfg.DevLogin, "dev-login", cfg.DevLogin, `accept login code "dev:<openid>" without WeChat (development only)`)
	fs.StringVar(&cfg.LogLevel, "log-level", cfg.LogLevel, "log level: debug, info, warn, error")
	fs.StringVar(&cfg.Pprof, "pprof", cfg.Pprof, "admin address for pprof and the runtime log level, e.g. 127.0.0.1:6060 (off by default; unauthenticated)")
	fs.DurationVar(&cfg.ShutdownGrace, "shutdown-grace", cfg.ShutdownGrace, "on SIGTERM/SIGINT, time allowed to drain requests and MQTT batches, flush and close before exiting non-zero")
	fs.StringVar(&cfg.Policy.Dir, "policies", cfg.Policy.Dir, "directory of Rego policies")
	fs.DurationVar(&cfg.Cloud.BackoffMax, "cloud-backoff-max", cfg.Cloud.BackoffMax, "cap of the jittered backoff between failed cloud exchanges")
	fs.IntVar(&cfg.Cloud.BatchReadings, "cloud-batch-readings", cfg.Cloud.BatchReadings, "target readings per sync push")
	fs.BoolVar(&cfg.UnsafeNoSync, "unsafe-no-fsync", false, "TESTING ONLY: disable fsync")
	fs.IntVar(&cfg.UnsafeCrashAfterPush, "unsafe-crash-after-push", 0, "TESTING ONLY: kill -9 the edge after N pushes the cloud acknowledged, before recording the ack")
	fs.DurationVar(&cfg.UnsafeClockOffset, "unsafe-clock-offset", 0, "TESTING ONLY: shift this edge's HLC wall clock by this much (simulates a skewed clock)")
	fs.BoolVar(&cfg.UnsafeAckBeforeCommit, "unsafe-ack-before-commit", false, "TESTING ONLY: acknowledge messages before they are durable (proves crash tests detect loss)")
	fs.Func("api-trusted-proxies", "IPs or CIDRs (comma separated) of proxies whose X-Forwarded-For names the client", func(v string) error {
		cfg.API.TrustedProxies = config.SplitList(v)
		return nil
	})
	fs.IntVar(&cfg.API.MaxConns, "api-max-conns", cfg.API.MaxConns, "cap on open HTTP connections")
	fs.IntVar(&cfg.API.MaxConnsPerIP, "api-max-conns-per-ip", cfg.API.MaxConnsPerIP, "cap on open HTTP connections from one address (trusted proxies exempt)")
	fs.BoolVar(&cfg.API.BypassPolicy, "unsafe-bypass-policy", false, "BENCHMARK ONLY: skip policy checks")
	fs.BoolVar(&cfg.CheckConfig, "check-config", false, "validate the configuration (file and flags), print it with secrets masked, and exit: 0 if valid, 2 if not")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: edge [flags]\n\nOutpost edge gateway: embedded MQTT broker, durable ingest, HTTP API.\nFlags override the config file, which overrides built-in defaults.\n\n")
		fs.PrintDefaults()
	}
	return fs
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

// Validate reports everything wrong with c, each problem named by its key,
// as config.Errors.
func (c *Config) Validate() error { return c.validate(nil) }

// validate is Validate over problems already found (reading credentials).
func (c *Config) validate(errs config.Errors) error {
	if !ident.DeviceID(c.ID) {
		errs.Add("id", "%q must match [A-Za-z0-9._-]{1,64}", c.ID)
	}
	if c.DataDir == "" {
		errs.Add("data", "the data directory must be set")
	}
	if err := config.CheckHostPort(c.HTTP); err != nil {
		errs.Add("http", "%v", err)
	}
	if c.Pprof != "" {
		if err := config.CheckHostPort(c.Pprof); err != nil {
			errs.Add("pprof", "%v", err)
		}
	}
	if c.MemoryLimitMB < 0 {
		errs.Add("memory_limit_mb", "%d must be ≥ 0 (0: no soft limit)", c.MemoryLimitMB)
	}
	if c.GCPercent < 0 {
		errs.Add("gc_percent", "%d must be ≥ 0 (0: the runtime default)", c.GCPercent)
	}
	switch {
	case c.MQTT.Broker == "" && c.MQTT.Listen == "":
		errs.Add("mqtt.listen", "either mqtt.listen (embedded broker) or mqtt.broker (external) must be set")
	case c.MQTT.Broker != "" && !strings.Contains(c.MQTT.Broker, "://"):
		errs.Add("mqtt.broker", "%q must be a URL like tcp://host:1883", c.MQTT.Broker)
	case c.MQTT.Broker == "":
		if err := config.CheckHostPort(c.MQTT.Listen); err != nil {
			errs.Add("mqtt.listen", "%v", err)
		}
	}
	if c.MQTT.ConnectTimeout <= 0 || c.MQTT.ConnectTimeout > 5*time.Minute {
		errs.Add("mqtt.connect_timeout", "%s must be in (0, 5m]", c.MQTT.ConnectTimeout)
	}
	if c.MQTT.LiveInterval < time.Millisecond || c.MQTT.LiveInterval > 10*time.Second {
		errs.Add("mqtt.live_interval", "%s must be in [1ms, 10s]", c.MQTT.LiveInterval)
	}
	if c.MQTT.MaxConnections < 1 {
		errs.Add("mqtt.max_connections", "%d must be ≥ 1", c.MQTT.MaxConnections)
	}
	if _, _, _, err := ParseLocation(c.Location); err != nil {
		errs.Add("location", "%v", err)
	}
	if err := wire.CheckAdvertise(c.Advertise); err != nil {
		errs.Add("advertise", "%v", err)
	}
	for dev, hash := range c.MQTT.Devices {
		if !ident.DeviceID(dev) {
			errs.Add("mqtt.devices", "device id %q must match [A-Za-z0-9._-]{1,64}", dev)
		}
		if !strings.HasPrefix(hash, "$2") {
			errs.Add("mqtt.devices."+dev, "the password must be a bcrypt hash (generate one with: edge hash-password)")
		}
	}
	if len(c.Cloud.URLs) > 0 && c.Cloud.Token == "" && c.Cloud.TokenFile == "" { // a failed token_file is reported already
		errs.Add("cloud.token", "empty while cloud.urls are set: the cloud token is this edge's credential at cloud-sync")
	}
	for _, u := range c.Cloud.URLs {
		if !strings.HasPrefix(u, "http://") && !strings.HasPrefix(u, "https://") {
			errs.Add("cloud.urls", "%q must be an http(s) URL of a cloud-sync node", u)
		}
	}
	if c.Cloud.MaxClockDrift < 0 {
		errs.Add("cloud.max_clock_drift", "%s must be ≥ 0", c.Cloud.MaxClockDrift)
	}
	if c.Cloud.MaxOffline < 0 {
		errs.Add("cloud.max_offline", "%s must be ≥ 0 (0: the syncer's default)", c.Cloud.MaxOffline)
	}
	if c.Cloud.BatchReadings < 0 {
		errs.Add("cloud.batch_readings", "%d must be ≥ 0 (0: the syncer's default)", c.Cloud.BatchReadings)
	}
	if c.Cloud.BackoffMax < 0 {
		errs.Add("cloud.backoff_max", "%s must be ≥ 0 (0: the syncer's default)", c.Cloud.BackoffMax)
	}
	if c.Ingest.MaxBatch < 1 || c.Ingest.MaxBatch > 100000 {
		errs.Add("ingest.max_batch", "%d must be 1..100000", c.Ingest.MaxBatch)
	}
	if c.Ingest.Linger < 0 || c.Ingest.Linger > time.Second {
		errs.Add("ingest.linger", "%s must be 0..1s", c.Ingest.Linger)
	}
	if c.Ingest.QuotaMB < 0 {
		errs.Add("ingest.quota_mb", "%d must be ≥ 0 (0: no quota)", c.Ingest.QuotaMB)
	}
	if c.Ingest.MinFreeMB < 0 {
		errs.Add("ingest.min_free_mb", "%d must be ≥ 0", c.Ingest.MinFreeMB)
	}
	if c.Ingest.Retention < 0 {
		errs.Add("ingest.retention", "%s must be ≥ 0", c.Ingest.Retention)
	}
	if c.Ingest.MaxDeadLetters < 0 {
		errs.Add("ingest.max_dead_letters", "%d must be ≥ 0", c.Ingest.MaxDeadLetters)
	}
	if c.Auth.AccessTTL < 0 || c.Auth.RefreshTTL < 0 {
		errs.Add("auth", "access_ttl (%s) and refresh_ttl (%s) must be ≥ 0", c.Auth.AccessTTL, c.Auth.RefreshTTL)
	}
	if c.API.BodyLimitKB < 0 {
		errs.Add("api.body_limit_kb", "%d must be ≥ 0", c.API.BodyLimitKB)
	}
	if c.API.RateLimitPerIP < 0 || c.API.RateLimitPerUser < 0 {
		errs.Add("api", "rate_limit_per_ip (%g) and rate_limit_per_user (%g) must be ≥ 0 (0 disables)", c.API.RateLimitPerIP, c.API.RateLimitPerUser)
	}
	if _, err := httpguard.ParseTrustedProxies(c.API.TrustedProxies); err != nil {
		errs.Add("api.trusted_proxies", "%v", err)
	}
	if c.API.OnlineWindow < 0 {
		errs.Add("api.online_window", "%s must be ≥ 0 (0: the default)", c.API.OnlineWindow)
	}
	switch {
	case c.API.MaxConns < 0 || c.API.MaxConnsPerIP < 0:
		errs.Add("api.max_conns", "max_conns (%d) and max_conns_per_ip (%d) must be ≥ 0 (0: the default)", c.API.MaxConns, c.API.MaxConnsPerIP)
	case c.API.MaxConns > 0 && c.API.MaxConnsPerIP > c.API.MaxConns:
		errs.Add("api.max_conns_per_ip", "%d must not exceed api.max_conns (%d)", c.API.MaxConnsPerIP, c.API.MaxConns)
	}
	if c.ShutdownGrace <= 0 {
		errs.Add("shutdown_grace", "%s must be positive", c.ShutdownGrace)
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		errs.Add("log_level", "log level %q must be debug, info, warn or error", c.LogLevel)
	}
	if !c.Development {
		c.checkCredentials(false, &errs, new([]config.Notice))
	}
	if c.UnsafeAckBeforeCommit && !c.UnsafeNoSync {
		c.UnsafeNoSync = true
	}
	return errs.Err()
}

// Masked is c with its secrets (the cloud token, the external broker's
// password, the devices' password hashes, the WeChat secret) replaced by
// config.Mask, for printing.
func (c Config) Masked() Config {
	c.Cloud.Token = config.MaskString(c.Cloud.Token)
	c.MQTT.Password = config.MaskString(c.MQTT.Password)
	c.MQTT.Devices = config.MaskValues(c.MQTT.Devices)
	c.WeChat.Secret = config.MaskString(c.WeChat.Secret)
	return c
}

// checkCredentials refuses (or, in development, notes) placeholder secrets
// and a cloud token under config.MinTokenLen.
func (c *Config) checkCredentials(development bool, errs *config.Errors, notes *[]config.Notice) {
	config.CheckToken("cloud.token", c.Cloud.Token, development, errs, notes)
	config.CheckSecret("mqtt.password", c.MQTT.Password, development, errs, notes)
	config.CheckSecret("wechat.secret", c.WeChat.Secret, development, errs, notes)
}

// Notices are the start-up warnings of this configuration: in development,
// every convenience in force (dev login, admins, the open broker,
// placeholder and short tokens); always, dev login and credential files
// others can read.
func (c Config) Notices() []config.Notice {
	var n []config.Notice
	if c.Development {
		n = append(n, config.Notice{Key: "development", Msg: "development configuration: a placeholder or short cloud token is accepted and development conveniences are on; never deploy it"})
	}
	if c.DevLogin {
		n = append(n, config.Notice{Key: "dev_login", Msg: `dev login is on: anyone can log in as anyone with the code "dev:<openid>"`})
	}
	switch {
	case len(c.Admins) > 0 && c.DevLogin:
		n = append(n, config.Notice{Key: "admins", Msg: fmt.Sprintf("%v hold the admin role and dev login is on: anyone can log in as an admin", c.Admins)})
	case len(c.Admins) > 0 && c.Development:
		n = append(n, config.Notice{Key: "admins", Msg: fmt.Sprintf("%v hold the admin role whatever the synced roles say", c.Admins)})
	}
	if c.Development {
		if c.MQTT.Broker == "" && len(c.MQTT.Devices) == 0 {
			n = append(n, config.Notice{Key: "mqtt.devices", Msg: "the embedded broker is open: any client may connect and publish"})
		}
		var ignored config.Errors
		c.checkCredentials(true, &ignored, &n)
	}
	return append(n, c.fileNotices...)
}
