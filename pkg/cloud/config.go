// Package cloud assembles a cloud-sync node from its parts — the replicated
// state machine (fsm), the raft member (raftnode), the HTTP API (httpapi) and
// authentication (auth) — and owns its configuration: built-in defaults,
// overridden by a YAML file, overridden by command-line flags.
package cloud

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/outpost-edge/outpost/pkg/cloud/httpapi"
	"github.com/outpost-edge/outpost/pkg/cloud/raftnode"
	"github.com/outpost-edge/outpost/pkg/cloud/sinks"
	"github.com/outpost-edge/outpost/pkg/config"
	"github.com/outpost-edge/outpost/pkg/httpguard"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Config is a node's configuration. YAML keys are the snake_case names.
type Config struct {
	ID            string   `yaml:"id"`
	Raft          string   `yaml:"raft"`
	RaftAdvertise string   `yaml:"raft_advertise"`
	HTTP          string   `yaml:"http"`
	HTTPAdvertise string   `yaml:"http_advertise"`
	Data          string   `yaml:"data"`
	Bootstrap     bool     `yaml:"bootstrap"`
	BootstrapNode string   `yaml:"bootstrap_node"` // see -bootstrap-node
	Join          []string `yaml:"join"`
	// Development marks a development configuration (configs/dev/): it
	// may hold placeholder and short tokens, and every convenience in force
	// is announced at start-up. Outside it those are refused.
	Development bool              `yaml:"development"`
	EdgeTokens  map[string]string `yaml:"edge_tokens"`
	// EdgeTokensFile adds the tokens of a file (EDGE=TOKEN lines or a YAML
	// map) or of a directory of files named by edge id (a mounted Secret).
	EdgeTokensFile string   `yaml:"edge_tokens_file"`
	APIToken       string   `yaml:"api_token"`
	APITokenFile   string   `yaml:"api_token_file"`
	Admins         []string `yaml:"admins"`
	DevLogin       bool     `yaml:"dev_login"`
	// AuthFailureLimit throttles failed bearer-token checks: failures per
	// second per client address (burst twice that) before requests from
	// it get 429; 0 disables.
	AuthFailureLimit float64 `yaml:"auth_failure_limit"`
	// WeChat code2session credentials for users' logins (edges forward
	// theirs here); empty AppID disables WeChat login.
	WeChatAppID      string `yaml:"wechat_appid"`
	WeChatSecret     string `yaml:"wechat_secret"`
	WeChatSecretFile string `yaml:"wechat_secret_file"`
	WeChatAPIBase    string `yaml:"wechat_api_base"`
	// WeChatSubscribeTemplate is the subscribe-message template alert
	// notifications are sent with (rules with a notify action); empty:
	// none are sent. It needs the WeChat credentials above.
	WeChatSubscribeTemplate string        `yaml:"wechat_subscribe_template"`
	AccessTTL               time.Duration `yaml:"access_ttl"`
	RefreshTTL              time.Duration `yaml:"refresh_ttl"`
	// RefreshReuseGrace: a refresh retried with the same token this soon
	// gets the same pair (default 30s; negative: every reuse revokes).
	RefreshReuseGrace time.Duration `yaml:"refresh_reuse_grace"`

	MaxClockDrift  time.Duration `yaml:"max_clock_drift"`
	HeartbeatFresh time.Duration `yaml:"heartbeat_fresh"`
	// PullHold is the longest an edge's empty pull is held (long-poll)
	// before it is answered empty.
	PullHold time.Duration `yaml:"pull_hold"`
	// MaxOffline is the longest an edge may hold a user's change before
	// syncing it and still have it accepted on the user's original proof
	// (edge restriction); match the edges' cloud.max_offline.
	MaxOffline time.Duration `yaml:"max_offline"`
	// Retention is how long readings are kept, by reading time; older ones
	// are deleted (device records stay). Any duration works, down to
	// seconds (tests, soak runs).
	Retention time.Duration `yaml:"retention"`
	// LogRetention is how long the export log (GET /api/v1/export, the
	// sinks' source) keeps a change once every configured sink has taken
	// it. Pull-only export consumers must resume within it; one that falls
	// further behind gets 410 Gone and the earliest cursor kept.
	LogRetention time.Duration `yaml:"log_retention"`

	HeartbeatTimeout time.Duration `yaml:"heartbeat_timeout"`
	// LeaderHeartbeatTimeout is the heartbeat timeout of the node that
	// leads (raftnode.Config); 0 is twice HeartbeatTimeout.
	LeaderHeartbeatTimeout time.Duration     `yaml:"leader_heartbeat_timeout"`
	ElectionTimeout        time.Duration     `yaml:"election_timeout"`
	LeaderLeaseTimeout     time.Duration     `yaml:"leader_lease_timeout"`
	CommitTimeout          time.Duration     `yaml:"commit_timeout"`
	SnapshotInterval       time.Duration     `yaml:"snapshot_interval"`
	SnapshotThreshold      uint64            `yaml:"snapshot_threshold"`
	TrailingLogs           uint64            `yaml:"trailing_logs"`
	MaxEntryBytes          int               `yaml:"max_entry_bytes"`
	MaxInflightEntries     int               `yaml:"max_inflight_entries"`
	GroupCommitWait        time.Duration     `yaml:"group_commit_wait"`
	MaxPendingBytes        int64             `yaml:"max_pending_bytes"`
	MaxQueueDelay          time.Duration     `yaml:"max_queue_delay"`
	AdmitWait              time.Duration     `yaml:"admit_wait"`
	RaftDial               map[string]string `yaml:"raft_dial"`

	// MetricsToken is a bearer token that reads /metrics and nothing else
	// (Prometheus' authorization.credentials); the API token and a cluster
	// certificate read it too.
	MetricsToken string `yaml:"metrics_token"`
	// MetricsTokenFile holds the metrics token instead (a mounted Secret).
	MetricsTokenFile string `yaml:"metrics_token_file"`
	// ClusterCA, ClusterCert and ClusterKey are PEM files: the cluster's
	// CA and this node's certificate and key. They secure raft and
	// node-to-node HTTP with mutual TLS; without them the raft address
	// must be loopback (development).
	ClusterCA   string `yaml:"cluster_ca"`
	ClusterCert string `yaml:"cluster_cert"`
	ClusterKey  string `yaml:"cluster_key"`
	// TLSCert and TLSKey (PEM) serve the HTTP port over TLS. With cluster
	// TLS the port is https either way (presenting the cluster
	// certificate when these are unset).
	TLSCert string `yaml:"tls_cert"`
	TLSKey  string `yaml:"tls_key"`
	// TrustedProxies are the IPs or CIDRs of the proxies (TLS terminators,
	// load balancers) whose X-Forwarded-For names the client; empty: the
	// peer is the client. MaxConns and MaxConnsPerIP cap the HTTP port's
	// open connections, in total and per address (trusted proxies exempt).
	TrustedProxies []string `yaml:"trusted_proxies"`
	MaxConns       int      `yaml:"max_conns"`
	MaxConnsPerIP  int      `yaml:"max_conns_per_ip"`

	// Pprof is the opt-in admin address (pprof and the runtime log level);
	// empty disables it.
	Pprof        string `yaml:"pprof"`
	LogLevel     string `yaml:"log_level"`
	RaftLogLevel string `yaml:"raft_log_level"`
	// ShutdownGrace bounds a graceful stop: HTTP drain, raft and state
	// close. Past it the process exits non-zero.
	ShutdownGrace time.Duration `yaml:"shutdown_grace"`

	// GCPercent and MemoryLimitMB tune the Go collector (runtime/debug):
	// the state machine allocates heavily per entry, and at the default
	// GOGC=100 garbage collection costs a quarter of a node's CPU on small
	// pushes; 400 with a soft limit keeps that cheap while big batches stay
	// bounded. The limit must stay well above a node's working set: near
	// it the collector runs back to back. At 128 MiB, a leader serving a
	// reconnect storm of 1,000 edges (a live heap of about 70 MB plus
	// 1,000 connections' stacks and buffers) collected every 80 ms and
	// spent half its CPU doing so, and the storm drained in 48 s instead
	// of 20. The GOGC and GOMEMLIMIT environment variables win.
	GCPercent     int   `yaml:"gc_percent"`
	MemoryLimitMB int64 `yaml:"memory_limit_mb"`

	// Export streams every merged change to NATS JetStream and Kafka
	// (package sinks): the leader publishes, each sink's position is
	// replicated.
	Export sinks.Options `yaml:"export"`

	// CheckConfig (-check-config) asks main to validate and print the
	// effective configuration instead of running.
	CheckConfig bool `yaml:"-"`

	// fileNotices are the warnings reading credential files raised.
	fileNotices []config.Notice
}

// Defaults are the built-in settings. The raft settings are
// raftnode.DefaultConfig's and the HTTP caps httpapi.DefaultConfig's: those
// are their one source.
func Defaults() Config {
	r, h := raftnode.DefaultConfig(), httpapi.DefaultConfig()
	return Config{
		MaxConns: h.MaxConns, MaxConnsPerIP: h.MaxConnsPerIP,
		Raft: "127.0.0.1:7000", HTTP: "127.0.0.1:8090", Data: "./data/cloud",
		MaxClockDrift: 5 * time.Minute, HeartbeatFresh: 90 * time.Second, PullHold: wire.MaxPullWait, MaxOffline: 30 * 24 * time.Hour,
		Retention: 30 * 24 * time.Hour, LogRetention: 7 * 24 * time.Hour,
		AccessTTL: time.Hour, RefreshTTL: 30 * 24 * time.Hour,
		HeartbeatTimeout: r.HeartbeatTimeout, ElectionTimeout: r.ElectionTimeout,
		LeaderLeaseTimeout: r.LeaderLeaseTimeout, CommitTimeout: r.CommitTimeout,
		SnapshotInterval: r.SnapshotInterval, SnapshotThreshold: r.SnapshotThreshold, TrailingLogs: r.TrailingLogs,
		MaxEntryBytes: r.MaxEntryBytes, MaxInflightEntries: r.MaxInflightEntries,
		GroupCommitWait: r.GroupCommitWait, MaxPendingBytes: r.MaxPendingBytes,
		MaxQueueDelay: r.MaxQueueDelay, AdmitWait: r.AdmitWait,
		LogLevel: "info", RaftLogLevel: r.RaftLogLevel, ShutdownGrace: 10 * time.Second,
		GCPercent: 400, MemoryLimitMB: 512,
		AuthFailureLimit: 10,
		Export:           sinks.DefaultOptions(),
	}
}

// Credentials come from these environment variables when no flag gives
// them (they win over the config file), so they need not be in argv.
const (
	EnvAPIToken     = "OUTPOST_API_TOKEN"
	EnvEdgeTokens   = "OUTPOST_EDGE_TOKENS" // EDGE=TOKEN pairs, comma or newline separated
	EnvWeChatSecret = "OUTPOST_WECHAT_SECRET"
	EnvMetricsToken = "OUTPOST_METRICS_TOKEN"
)

// ErrUsage marks a command-line or configuration mistake; main prints it
// and exits 2.
var ErrUsage = errors.New("usage")

// Parse builds the configuration from args (without the program name):
// defaults, then the -config file, then the flags given. It returns
// flag.ErrHelp after printing help for -h.
func Parse(args []string, out io.Writer) (Config, error) { return parse(args, out, os.Getenv) }

func parse(args []string, out io.Writer, getenv func(string) string) (Config, error) {
	fs := flag.NewFlagSet("cloud-sync", flag.ContinueOnError)
	fs.SetOutput(out)
	var (
		cfgFile      = fs.String("config", "", "YAML config `file` (see configs/cloud-sync.yaml); flags override it")
		id           = fs.String("id", "", "this node's unique `id` in the cluster (required)")
		raftAddr     = fs.String("raft", "", "`host:port` the raft transport listens on (default 127.0.0.1:7000)")
		raftAdv      = fs.String("raft-advertise", "", "`host:port` peers dial for raft (default: -raft; required if -raft's host is unspecified)")
		httpAddr     = fs.String("http", "", "`host:port` the HTTP API listens on (default 127.0.0.1:8090)")
		httpAdv      = fs.String("http-advertise", "", "`host:port` other nodes use to forward requests here (default: -http)")
		data         = fs.String("data", "", "data `dir` for the raft log, snapshots and state (default ./data/cloud)")
		bootstrap    = fs.Bool("bootstrap", false, "bootstrap a new cluster with this node as its only member (first start only; ignored once the data dir has state)")
		join         = fs.String("join", "", "join the cluster through any member's HTTP `URL`s (comma-separated); retried until it succeeds")
		bootNode     = fs.String("bootstrap-node", "", "`id` of the node that bootstraps a new cluster; other nodes -join (one command line for every replica)")
		grace        = fs.Duration("shutdown-grace", 0, "on SIGTERM/SIGINT, time allowed to drain HTTP and close raft and the state before exiting non-zero (default 10s)")
		apiToken     = fs.String("api-token", "", "service `token` for the consumer API (/api/v1) and cluster changes (visible in ps: prefer -api-token-file or $"+EnvAPIToken+")")
		apiFile      = fs.String("api-token-file", "", "read the service token from this `file`")
		edgeFile     = fs.String("edge-tokens-file", "", "read edge tokens from this `path`: EDGE=TOKEN lines, a YAML map, or a directory of files named by edge id")
		wxFile       = fs.String("wechat-secret-file", "", "read the WeChat secret from this `file`")
		devMode      = fs.Bool("development", false, "development configuration: allow placeholder and short tokens, announce every development convenience (never in production)")
		authLimit    = fs.Float64("auth-failure-limit", 0, "failed bearer-token checks per second per client address (burst twice that) before 429; 0 disables (default 10)")
		metricsTok   = fs.String("metrics-token", "", "bearer `token` that may read /metrics (the API token and cluster certificates may too; visible in ps: prefer -metrics-token-file or $"+EnvMetricsToken+")")
		metricsFil   = fs.String("metrics-token-file", "", "read the metrics token from this `file`")
		clusterCA    = fs.String("cluster-ca", "", "PEM `file`: the cluster CA; with -cluster-cert and -cluster-key, raft and node-to-node HTTP use mutual TLS")
		clusterCrt   = fs.String("cluster-cert", "", "PEM `file`: this node's cluster certificate (signed by -cluster-ca)")
		clusterKey   = fs.String("cluster-key", "", "PEM `file`: the key of -cluster-cert")
		tlsCert      = fs.String("tls-cert", "", "PEM `file`: certificate the HTTP port serves TLS with (with -tls-key)")
		tlsKey       = fs.String("tls-key", "", "PEM `file`: the key of -tls-cert")
		admins       = fs.String("admin", "", "`openids` (comma-separated) that hold the admin role (used by the identity layer)")
		devLogin     = fs.Bool("dev-login", false, "enable dev login (dev:<openid>) — development only (used by the identity layer)")
		wxAppID      = fs.String("wechat-appid", "", "WeChat mini-program `appid` for code2session logins")
		wxSecret     = fs.String("wechat-secret", "", "WeChat mini-program `secret`")
		wxBase       = fs.String("wechat-api-base", "", "WeChat API base `URL` (default https://api.weixin.qq.com)")
		wxTemplate   = fs.String("wechat-subscribe-template", "", "WeChat subscribe-message template `id` for alert notifications")
		accessTTL    = fs.Duration("access-ttl", 0, "lifetime of users' access tokens (default 1h: they verify offline at every edge)")
		refreshTTL   = fs.Duration("refresh-ttl", 0, "lifetime of users' signed refresh tokens (default 720h)")
		drift        = fs.Duration("max-clock-drift", 0, "reject HLC stamps further ahead of this node's clock than this (default 5m)")
		maxOffline   = fs.Duration("max-offline", 0, "accept an edge's user changes on their original proof for at most this long after they were made (default 720h)")
		retention    = fs.Duration("retention", 0, "keep readings this long, by reading time (default 720h; down to seconds for tests)")
		logRetention = fs.Duration("log-retention", 0, "keep export-log changes this long once every export sink took them (default 168h)")
		fresh        = fs.Duration("heartbeat-fresh", 0, "an edge is healthy if its last heartbeat is younger than this (default 90s)")
		pullHold     = fs.Duration("pull-hold", 0, "longest an edge's empty pull is held before it is answered (long-poll; default 25s)")
		hbTimeout    = fs.Duration("heartbeat-timeout", 0, "raft heartbeat timeout: a follower starts an election after 1-2x this without contact (default 300ms)")
		elTimeout    = fs.Duration("election-timeout", 0, "raft election timeout (default 300ms)")
		lease        = fs.Duration("leader-lease-timeout", 0, "a leader that cannot reach a quorum for this long steps down (default 250ms)")
		commit       = fs.Duration("commit-timeout", 0, "raft commit timeout: max delay before followers learn a commit when idle (default 250ms)")
		snapInt      = fs.Duration("snapshot-interval", 0, "how often raft checks whether to snapshot (default 30s)")
		snapThresh   = fs.Uint64("snapshot-threshold", 0, "log entries since the last snapshot that trigger one (default 2048)")
		trailing     = fs.Uint64("trailing-logs", 0, "log entries kept after a snapshot for slow followers (default 1024)")
		maxPending   = fs.Int64("max-pending-bytes", 0, "admission control: the most bytes of proposals queued or in flight, and of sync bodies waiting for room; a write that cannot wait gets 429 (default 32 MiB)")
		logLevel     = fs.String("log-level", "", "log level: debug, info, warn, error (default info)")
		proxies      = fs.String("trusted-proxies", "", "`IPs or CIDRs` (comma-separated) of proxies whose X-Forwarded-For names the client")
		maxConns     = fs.Int("max-conns", 0, "cap on open HTTP connections (default 16384)")
		maxPerIP     = fs.Int("max-conns-per-ip", 0, "cap on open HTTP connections from one address, trusted proxies exempt (default 1024)")
		pprofAddr    = fs.String("pprof", "", "admin `address` for pprof and the runtime log level, e.g. 127.0.0.1:6061 (off by default; unauthenticated)")
		check        = fs.Bool("check-config", false, "validate the configuration (file and flags), print it with secrets masked, and exit: 0 if valid, 2 if not")
	)
	edgeTokens := map[string]string{}
	fs.Func("edge-token", "`EDGE=TOKEN` credential of one edge (repeatable; visible in ps: prefer -edge-tokens-file)", func(v string) error {
		e, t, ok := strings.Cut(v, "=")
		if !ok || !wire.ValidName(e) || t == "" {
			return fmt.Errorf("want EDGE=TOKEN with EDGE matching [A-Za-z0-9._-]{1,64}")
		}
		edgeTokens[e] = t
		return nil
	})
	raftDial := map[string]string{}
	fs.Func("raft-dial", "`NODE=HOST:PORT` dial this address for peer NODE instead of its advertised one (NAT, split horizon; repeatable)", func(v string) error {
		n, a, ok := strings.Cut(v, "=")
		if !ok || n == "" || a == "" {
			return fmt.Errorf("want NODE=HOST:PORT")
		}
		raftDial[n] = a
		return nil
	})
	fs.Usage = func() {
		fmt.Fprintf(out, "Usage: cloud-sync [-config FILE] -id NODE -raft ADDR -http ADDR -data DIR (-bootstrap | -join URL) [flags]\n\n"+
			"cloud-sync is Outpost's raft-replicated cloud: edges sync to it, consumers read merged data from it.\n"+
			"Flags override the config file, which overrides built-in defaults.\n"+
			"`cloud-sync certs -h` makes development certificates for the -cluster-* and -tls-* flags.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return Config{}, err
		}
		return Config{}, fmt.Errorf("%w: %v", ErrUsage, err)
	}
	if fs.NArg() > 0 {
		return Config{}, fmt.Errorf("%w: unexpected argument %q", ErrUsage, fs.Arg(0))
	}
	cfg := Defaults()
	if *cfgFile != "" {
		if err := loadFile(*cfgFile, &cfg); err != nil {
			return Config{}, err
		}
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	str := func(name string, dst *string, v string) {
		if set[name] {
			*dst = v
		}
	}
	dur := func(name string, dst *time.Duration, v time.Duration) {
		if set[name] {
			*dst = v
		}
	}
	str("id", &cfg.ID, *id)
	str("raft", &cfg.Raft, *raftAddr)
	str("raft-advertise", &cfg.RaftAdvertise, *raftAdv)
	str("http", &cfg.HTTP, *httpAddr)
	str("http-advertise", &cfg.HTTPAdvertise, *httpAdv)
	str("data", &cfg.Data, *data)
	str("api-token", &cfg.APIToken, *apiToken)
	str("metrics-token", &cfg.MetricsToken, *metricsTok)
	str("cluster-ca", &cfg.ClusterCA, *clusterCA)
	str("cluster-cert", &cfg.ClusterCert, *clusterCrt)
	str("cluster-key", &cfg.ClusterKey, *clusterKey)
	str("tls-cert", &cfg.TLSCert, *tlsCert)
	str("tls-key", &cfg.TLSKey, *tlsKey)
	str("log-level", &cfg.LogLevel, *logLevel)
	if set["bootstrap"] {
		cfg.Bootstrap = *bootstrap
		if *bootstrap && !set["join"] {
			cfg.Join = nil
		}
	}
	if set["join"] {
		cfg.Join = splitList(*join)
		if !set["bootstrap"] {
			cfg.Bootstrap = false
		}
	}
	if set["admin"] {
		cfg.Admins = splitList(*admins)
	}
	str("pprof", &cfg.Pprof, *pprofAddr)
	if set["trusted-proxies"] {
		cfg.TrustedProxies = splitList(*proxies)
	}
	if set["max-conns"] {
		cfg.MaxConns = *maxConns
	}
	if set["max-conns-per-ip"] {
		cfg.MaxConnsPerIP = *maxPerIP
	}
	str("bootstrap-node", &cfg.BootstrapNode, *bootNode)
	dur("shutdown-grace", &cfg.ShutdownGrace, *grace)
	if set["dev-login"] {
		cfg.DevLogin = *devLogin
	}
	str("wechat-appid", &cfg.WeChatAppID, *wxAppID)
	str("wechat-secret", &cfg.WeChatSecret, *wxSecret)
	str("wechat-api-base", &cfg.WeChatAPIBase, *wxBase)
	str("wechat-subscribe-template", &cfg.WeChatSubscribeTemplate, *wxTemplate)
	dur("access-ttl", &cfg.AccessTTL, *accessTTL)
	dur("refresh-ttl", &cfg.RefreshTTL, *refreshTTL)
	dur("max-clock-drift", &cfg.MaxClockDrift, *drift)
	dur("max-offline", &cfg.MaxOffline, *maxOffline)
	dur("retention", &cfg.Retention, *retention)
	dur("log-retention", &cfg.LogRetention, *logRetention)
	dur("heartbeat-fresh", &cfg.HeartbeatFresh, *fresh)
	dur("pull-hold", &cfg.PullHold, *pullHold)
	dur("heartbeat-timeout", &cfg.HeartbeatTimeout, *hbTimeout)
	dur("election-timeout", &cfg.ElectionTimeout, *elTimeout)
	dur("leader-lease-timeout", &cfg.LeaderLeaseTimeout, *lease)
	dur("commit-timeout", &cfg.CommitTimeout, *commit)
	dur("snapshot-interval", &cfg.SnapshotInterval, *snapInt)
	if set["snapshot-threshold"] {
		cfg.SnapshotThreshold = *snapThresh
	}
	if set["trailing-logs"] {
		cfg.TrailingLogs = *trailing
	}
	if set["max-pending-bytes"] {
		cfg.MaxPendingBytes = *maxPending
	}
	if len(edgeTokens) > 0 {
		// Flags override the file: -edge-token replaces its edge_tokens
		// rather than adding to them, so a deployment that passes its own
		// credentials never also accepts the development ones in the file.
		cfg.EdgeTokens = edgeTokens
	}
	if len(raftDial) > 0 {
		cfg.RaftDial = raftDial
	}
	if set["development"] {
		cfg.Development = *devMode
	}
	if set["auth-failure-limit"] {
		cfg.AuthFailureLimit = *authLimit
	}
	var errs config.Errors
	if set["edge-tokens-file"] {
		cfg.EdgeTokensFile = *edgeFile
	}
	cfg.resolveEdgeTokens(len(edgeTokens) > 0, set["edge-tokens-file"], getenv, &errs)
	if set["api-token-file"] {
		cfg.APITokenFile = *apiFile
	}
	if set["wechat-secret-file"] {
		cfg.WeChatSecretFile = *wxFile
	}
	if set["metrics-token-file"] {
		cfg.MetricsTokenFile = *metricsFil
	}
	for _, c := range []config.Credential{
		{Key: "api_token", FlagName: "api-token", Env: EnvAPIToken, Value: &cfg.APIToken, File: &cfg.APITokenFile,
			FlagValue: set["api-token"], FlagFile: set["api-token-file"]},
		{Key: "wechat_secret", FlagName: "wechat-secret", Env: EnvWeChatSecret, Value: &cfg.WeChatSecret, File: &cfg.WeChatSecretFile,
			FlagValue: set["wechat-secret"], FlagFile: set["wechat-secret-file"]},
		{Key: "metrics_token", FlagName: "metrics-token", Env: EnvMetricsToken, Value: &cfg.MetricsToken, File: &cfg.MetricsTokenFile,
			FlagValue: set["metrics-token"], FlagFile: set["metrics-token-file"]},
	} {
		c.Resolve(getenv, &errs, &cfg.fileNotices)
	}
	cfg.CheckConfig = *check
	return cfg, cfg.validate(errs)
}

// resolveEdgeTokens settles the edge tokens, highest source first: flags
// (-edge-token and -edge-tokens-file together, replacing the config
// file's), then $OUTPOST_EDGE_TOKENS, then the config file (edge_tokens and
// edge_tokens_file together). One edge listed twice at a level is an error.
func (c *Config) resolveEdgeTokens(flagTokens, flagFile bool, getenv func(string) string, errs *config.Errors) {
	if !flagTokens && !flagFile {
		if env := getenv(EnvEdgeTokens); env != "" {
			m, err := config.ParseTokenMap(env)
			if err != nil {
				errs.Add("edge_tokens", "$%s: %v", EnvEdgeTokens, err)
				return
			}
			c.EdgeTokens, c.EdgeTokensFile = m, ""
			return
		}
	}
	if flagTokens && !flagFile {
		c.EdgeTokensFile = "" // -edge-token replaces the config file's tokens, its file's too
	}
	if c.EdgeTokensFile == "" {
		return
	}
	m, notes, err := config.ReadTokenMap("edge_tokens_file", c.EdgeTokensFile)
	if err != nil {
		errs.Add("edge_tokens_file", "%v", err)
		return
	}
	c.fileNotices = append(c.fileNotices, notes...)
	if !flagTokens && flagFile {
		c.EdgeTokens = nil // the flag replaces the config file's tokens
	}
	if c.EdgeTokens == nil {
		c.EdgeTokens = map[string]string{}
	}
	for e, t := range m {
		if _, dup := c.EdgeTokens[e]; dup {
			errs.Add("edge_tokens_file", "edge %q also has a token in edge_tokens (or -edge-token): give it one", e)
			continue
		}
		c.EdgeTokens[e] = t
	}
}

// Notices are the start-up warnings of this configuration: in development,
// every convenience in force (dev login, admins, placeholder and short
// tokens); always, dev login and credential files others can read.
func (c Config) Notices() []config.Notice {
	var n []config.Notice
	if c.Development {
		n = append(n, config.Notice{Key: "development", Msg: "development configuration: placeholder and short tokens are accepted and development conveniences are on; never deploy it"})
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
		var ignored config.Errors
		c.checkCredentials(true, &ignored, &n)
	}
	return append(n, c.fileNotices...)
}

// checkCredentials refuses (or, in development, notes) placeholder secrets
// and tokens under config.MinTokenLen.
func (c *Config) checkCredentials(development bool, errs *config.Errors, notes *[]config.Notice) {
	config.CheckToken("api_token", c.APIToken, development, errs, notes)
	edges := make([]string, 0, len(c.EdgeTokens))
	for e := range c.EdgeTokens {
		edges = append(edges, e)
	}
	slices.Sort(edges)
	for _, e := range edges {
		config.CheckToken("edge_tokens."+e, c.EdgeTokens[e], development, errs, notes)
	}
	config.CheckSecret("wechat_secret", c.WeChatSecret, development, errs, notes)
	if c.MetricsToken != "" {
		config.CheckToken("metrics_token", c.MetricsToken, development, errs, notes)
	}
}

func splitList(s string) []string { return config.SplitList(s) }

// loadFile reads the YAML file over cfg; an unknown key is an error.
func loadFile(path string, cfg *Config) error {
	if err := config.LoadYAML(path, cfg); err != nil {
		return fmt.Errorf("%w: config file: %w", ErrUsage, err)
	}
	return nil
}

// Masked is c with its secrets (edge tokens, the API and metrics tokens,
// the WeChat secret) replaced by config.Mask, for printing.
func (c Config) Masked() Config {
	c.EdgeTokens = config.MaskValues(c.EdgeTokens)
	c.APIToken = config.MaskString(c.APIToken)
	c.MetricsToken = config.MaskString(c.MetricsToken)
	c.WeChatSecret = config.MaskString(c.WeChatSecret)
	if c.Export.Sinks != nil {
		masked := make([]sinks.Config, len(c.Export.Sinks))
		for i, s := range c.Export.Sinks {
			masked[i] = s.Masked()
		}
		c.Export.Sinks = masked
	}
	return c
}

// Validate checks the configuration and fills derived addresses. It
// reports every problem, each named by its key, as config.Errors (which
// matches ErrUsage too).
func (c *Config) Validate() error { return c.validate(nil) }

// validate is Validate over problems already found (reading credentials).
func (c *Config) validate(errs config.Errors) error {
	switch {
	case c.ID == "":
		errs.Add("id", "is required (-id)")
	case !wire.ValidName(c.ID):
		errs.Add("id", "%q must match [A-Za-z0-9._-]{1,64}", c.ID)
	}
	if c.Data == "" {
		errs.Add("data", "is required (-data)")
	}
	if c.BootstrapNode != "" {
		switch {
		case c.Bootstrap:
			errs.Add("bootstrap_node", "-bootstrap-node and -bootstrap are mutually exclusive")
		case !wire.ValidName(c.BootstrapNode):
			errs.Add("bootstrap_node", "%q must match [A-Za-z0-9._-]{1,64}", c.BootstrapNode)
		case c.BootstrapNode == c.ID:
			c.Bootstrap, c.Join = true, nil
		case len(c.Join) == 0:
			errs.Add("join", "-bootstrap-node %s: this node (%s) must -join the cluster", c.BootstrapNode, c.ID)
		}
	}
	if c.ShutdownGrace <= 0 {
		errs.Add("shutdown_grace", "%s must be positive", c.ShutdownGrace)
	}
	if c.Bootstrap && len(c.Join) > 0 {
		errs.Add("join", "-bootstrap and -join are mutually exclusive: bootstrap the first node, join the others")
	}
	for _, u := range c.Join {
		switch {
		case !strings.HasPrefix(u, "http://") && !strings.HasPrefix(u, "https://"):
			errs.Add("join", "%q must be an http(s) URL of a cluster member", u)
		case c.HTTPTLS() && !strings.HasPrefix(u, "https://"):
			errs.Add("join", "%q must be https://: with cluster TLS or -tls-cert every member's HTTP port is https", u)
		}
	}
	c.validateTLS(&errs)
	for _, a := range []struct {
		key            string
		listen, advert *string
	}{{"raft", &c.Raft, &c.RaftAdvertise}, {"http", &c.HTTP, &c.HTTPAdvertise}} {
		if err := config.CheckHostPort(*a.listen); err != nil {
			errs.Add(a.key, "%v", err)
			continue
		}
		adv, err := advertise(*a.listen, *a.advert)
		if err != nil {
			errs.Add(a.key+"_advertise", "%v", err)
			continue
		}
		*a.advert = adv
	}
	if !c.ClusterTLS() {
		// Without cluster TLS anyone who reaches the raft port is a
		// member: keep it where only this machine can.
		for _, a := range []struct{ key, addr string }{{"raft", c.Raft}, {"raft_advertise", c.RaftAdvertise}} {
			if a.addr != "" && !loopback(a.addr) {
				errs.Add(a.key, "%q is not a loopback address: without -cluster-ca, -cluster-cert and -cluster-key the raft "+
					"transport is unauthenticated and may listen on loopback only (127.0.0.0/8, ::1, localhost); "+
					"configure cluster TLS (`cloud-sync certs` makes development certificates)", a.addr)
			}
		}
	}
	if c.Pprof != "" {
		if err := config.CheckHostPort(c.Pprof); err != nil {
			errs.Add("pprof", "%v", err)
		}
	}
	if _, err := httpguard.ParseTrustedProxies(c.TrustedProxies); err != nil {
		errs.Add("trusted_proxies", "%v", err)
	}
	switch {
	case c.MaxConns < 0 || c.MaxConnsPerIP < 0:
		errs.Add("max_conns", "max_conns (%d) and max_conns_per_ip (%d) must be ≥ 0 (0: the default)", c.MaxConns, c.MaxConnsPerIP)
	case c.MaxConns > 0 && c.MaxConnsPerIP > c.MaxConns:
		errs.Add("max_conns_per_ip", "%d must not exceed max_conns (%d)", c.MaxConnsPerIP, c.MaxConns)
	}
	if c.BootstrapNode != "" && len(c.Join) > 1 {
		c.Join = withoutSelf(c.Join, c.HTTPAdvertise)
	}
	// The leader heartbeats every tenth to fifth of its timeout: at more
	// than 2.5x a follower's, a follower could go half its wait unheard.
	if c.LeaderHeartbeatTimeout != 0 && (c.LeaderHeartbeatTimeout < c.HeartbeatTimeout || 2*c.LeaderHeartbeatTimeout > 5*c.HeartbeatTimeout) {
		errs.Add("leader_heartbeat_timeout", "%s must be 0 (twice heartbeat_timeout) or from heartbeat_timeout (%s) to 2.5 times it", c.LeaderHeartbeatTimeout, c.HeartbeatTimeout)
	}
	if c.LeaderLeaseTimeout > c.HeartbeatTimeout {
		errs.Add("leader_lease_timeout", "%s must not exceed heartbeat_timeout (%s)", c.LeaderLeaseTimeout, c.HeartbeatTimeout)
	}
	if c.MaxClockDrift < 0 {
		errs.Add("max_clock_drift", "%s must be ≥ 0", c.MaxClockDrift)
	}
	if c.HeartbeatFresh <= 0 {
		errs.Add("heartbeat_fresh", "%s must be positive", c.HeartbeatFresh)
	}
	if c.PullHold <= 0 {
		errs.Add("pull_hold", "%s must be positive", c.PullHold)
	}
	if c.MaxOffline <= 0 {
		errs.Add("max_offline", "%s must be positive", c.MaxOffline)
	}
	if c.Retention < time.Second {
		errs.Add("retention", "%s must be at least 1s", c.Retention)
	}
	if c.LogRetention < time.Second {
		errs.Add("log_retention", "%s must be at least 1s", c.LogRetention)
	}
	if c.MaxInflightEntries < 1 {
		errs.Add("max_inflight_entries", "%d must be at least 1", c.MaxInflightEntries)
	}
	if c.GroupCommitWait > 100*time.Millisecond {
		errs.Add("group_commit_wait", "%s must be at most 100ms (a negative value turns the wait off)", c.GroupCommitWait)
	}
	if c.MaxEntryBytes < 0 {
		errs.Add("max_entry_bytes", "%d must be ≥ 0", c.MaxEntryBytes)
	}
	if c.MaxPendingBytes < 0 {
		errs.Add("max_pending_bytes", "%d must be ≥ 0", c.MaxPendingBytes)
	}
	if c.MaxQueueDelay < 0 || c.MaxQueueDelay > time.Minute {
		errs.Add("max_queue_delay", "%s must be between 0 (the default) and 1m", c.MaxQueueDelay)
	}
	if c.AdmitWait < 0 || c.AdmitWait > 9*time.Second {
		// A sync request's deadline is 10 s: a longer wait in admission
		// would leave it no time to commit.
		errs.Add("admit_wait", "%s must be between 0 (the default) and 9s", c.AdmitWait)
	}
	if c.MemoryLimitMB < 0 {
		errs.Add("memory_limit_mb", "%d must be ≥ 0 (0: no soft limit)", c.MemoryLimitMB)
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		errs.Add("log_level", "%q must be debug, info, warn or error", c.LogLevel)
	}
	for e := range c.EdgeTokens {
		if !wire.ValidName(e) {
			errs.Add("edge_tokens", "edge id %q must match [A-Za-z0-9._-]{1,64}", e)
		}
	}
	if c.AuthFailureLimit < 0 {
		errs.Add("auth_failure_limit", "%g must be ≥ 0 (0 disables the throttle)", c.AuthFailureLimit)
	}
	c.Export.Validate("export", &errs)
	if !c.Development {
		c.checkCredentials(false, &errs, new([]config.Notice))
	}
	if len(errs) == 0 {
		return nil
	}
	return usageErrors{errs}
}

// ClusterTLS reports whether the cluster's mutual TLS is configured.
func (c *Config) ClusterTLS() bool {
	return c.ClusterCA != "" || c.ClusterCert != "" || c.ClusterKey != ""
}

// HTTPTLS reports whether the HTTP port serves TLS: with -tls-cert, or
// with cluster TLS (node-to-node HTTP needs it).
func (c *Config) HTTPTLS() bool { return c.TLSCert != "" || c.TLSKey != "" || c.ClusterTLS() }

// validateTLS checks that the TLS files come in complete sets. Reading
// them is Start's (a bad file is a usage error there too): the
// configuration is validated where the files may not exist, e.g. against
// the paths a manifest mounts them at.
func (c *Config) validateTLS(errs *config.Errors) {
	if c.ClusterTLS() {
		for _, f := range []struct{ key, v string }{{"cluster_ca", c.ClusterCA}, {"cluster_cert", c.ClusterCert}, {"cluster_key", c.ClusterKey}} {
			if f.v == "" {
				errs.Add(f.key, "is required with the other -cluster-* files: set -cluster-ca, -cluster-cert and -cluster-key together")
			}
		}
	}
	switch {
	case c.TLSCert != "" && c.TLSKey == "":
		errs.Add("tls_key", "is required with -tls-cert")
	case c.TLSCert == "" && c.TLSKey != "":
		errs.Add("tls_cert", "is required with -tls-key")
	}
}

// usageErrors is config.Errors that also matches ErrUsage, the cloud's
// marker for a mistake main reports with exit 2.
type usageErrors struct{ config.Errors }

func (e usageErrors) Is(target error) bool { return target == ErrUsage || e.Errors.Is(target) }

// loopback reports whether host:port's host is a loopback address or
// "localhost" (names are not resolved: a name could point anywhere).
func loopback(hostport string) bool {
	host, _, err := net.SplitHostPort(hostport)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// advertise derives the address peers use from a listen address: the
// listen address itself when its host is concrete, else the hostname.
func advertise(listen, adv string) (string, error) {
	if adv != "" {
		if _, _, err := net.SplitHostPort(adv); err != nil {
			return "", fmt.Errorf("advertise address %q: %v", adv, err)
		}
		return adv, nil
	}
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return "", fmt.Errorf("%q is not host:port", listen)
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		h, err := os.Hostname()
		if err != nil {
			return "", fmt.Errorf("listen address %q has no host and the hostname is unknown; set the advertise address", listen)
		}
		host = h
	}
	return net.JoinHostPort(host, port), nil
}

// withoutSelf drops the URLs that point at self (host:port), so identical
// replicas can list every member, themselves included.
func withoutSelf(urls []string, self string) []string {
	var out []string
	for _, u := range urls {
		rest := u[strings.Index(u, "://")+3:]
		if i := strings.IndexByte(rest, '/'); i >= 0 {
			rest = rest[:i]
		}
		if !strings.EqualFold(rest, self) {
			out = append(out, u)
		}
	}
	if len(out) == 0 {
		return urls
	}
	return out
}
