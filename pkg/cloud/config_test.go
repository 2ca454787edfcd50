package cloud

import (
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/internal/daemontest"
	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/cloud/raftnode"
	"github.com/outpost-edge/outpost/pkg/cloud/sinks"
	"github.com/outpost-edge/outpost/pkg/config"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// TestShippedConfigIsTheDefaults: configs/cloud-sync.yaml (the production
// example) shows the built-in defaults, and the raft ones are raftnode's
// (their one source): loading the file over Defaults changes nothing but
// the settings it deliberately sets (a one-node cluster, credentials from
// files). The snapshot settings once disagreed (30s/2048/1024 here,
// 60s/8192/10240 in raftnode); this fails if they do again.
func TestShippedConfigIsTheDefaults(t *testing.T) {
	got := Defaults()
	if err := config.LoadYAML("../../configs/cloud-sync.yaml", &got); err != nil {
		t.Fatal(err)
	}
	want := Defaults()
	want.ID, want.Bootstrap, want.Join, want.Admins, want.RaftDial = "node1", true, []string{}, []string{}, map[string]string{}
	want.EdgeTokens = map[string]string{}
	want.Export.Sinks = []sinks.Config{}
	want.EdgeTokensFile, want.APITokenFile = "/etc/outpost/secrets/edge-tokens", "/etc/outpost/secrets/api-token"
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("configs/cloud-sync.yaml differs from the defaults:\n file %+v\n code %+v", got, want)
	}
	r := raftnode.DefaultConfig()
	if got.SnapshotInterval != r.SnapshotInterval || got.SnapshotThreshold != r.SnapshotThreshold || got.TrailingLogs != r.TrailingLogs {
		t.Fatalf("snapshots %s/%d/%d in the config, %s/%d/%d in raftnode", got.SnapshotInterval, got.SnapshotThreshold,
			got.TrailingLogs, r.SnapshotInterval, r.SnapshotThreshold, r.TrailingLogs)
	}
}

// TestSecurityRaftAddressNeedsClusterTLS: without the -cluster-* files the
// raft transport is unauthenticated (finding 1), so Validate allows it on
// loopback only; the files come as a complete set, and with them (or with
// -tls-cert) joins are https.
func TestSecurityRaftAddressNeedsClusterTLS(t *testing.T) {
	files := func(c *Config) { c.ClusterCA, c.ClusterCert, c.ClusterKey = "ca.pem", "n.pem", "n-key.pem" }
	for _, tc := range []struct {
		name string
		set  func(*Config)
		keys []string // keys of the problems Validate must report; none: valid
	}{
		{"loopback IPv4", func(c *Config) { c.Raft = "127.0.0.2:7000" }, nil},
		{"loopback IPv6", func(c *Config) { c.Raft = "[::1]:7000" }, nil},
		{"localhost", func(c *Config) { c.Raft = "localhost:7000" }, nil},
		{"routable", func(c *Config) { c.Raft = "10.0.0.5:7000" }, []string{"raft", "raft_advertise"}},
		{"every interface", func(c *Config) { c.Raft, c.RaftAdvertise = "0.0.0.0:7000", "127.0.0.1:7000" }, []string{"raft"}},
		{"empty host", func(c *Config) { c.Raft, c.RaftAdvertise = ":7000", "127.0.0.1:7000" }, []string{"raft"}},
		{"advertised name", func(c *Config) { c.RaftAdvertise = "cloud-0.example:7000" }, []string{"raft_advertise"}},
		{"routable with cluster TLS", func(c *Config) { c.Raft = "0.0.0.0:7000"; c.RaftAdvertise = "cloud-0.example:7000"; files(c) }, nil},
		{"partial cluster files", func(c *Config) { c.ClusterCA = "ca.pem" }, []string{"cluster_cert", "cluster_key"}},
		{"tls key without cert", func(c *Config) { c.TLSKey = "k.pem" }, []string{"tls_cert"}},
		{"http join with cluster TLS", func(c *Config) { files(c); c.Join = []string{"http://a:8090"} }, []string{"join"}},
		{"https join with cluster TLS", func(c *Config) { files(c); c.Join = []string{"https://a:8090"} }, nil},
		{"http join with public TLS", func(c *Config) { c.TLSCert, c.TLSKey = "c.pem", "k.pem"; c.Join = []string{"http://a:8090"} }, []string{"join"}},
		{"short metrics token", func(c *Config) { c.MetricsToken = "short" }, []string{"metrics_token"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Defaults()
			c.ID, c.Data = "n1", t.TempDir()
			tc.set(&c)
			err := c.Validate()
			var got []string
			if err != nil {
				ue, ok := err.(usageErrors)
				if !ok {
					t.Fatalf("Validate: %v is not a usage error", err)
				}
				for _, p := range ue.Errors {
					got = append(got, p.Key)
				}
			}
			if !reflect.DeepEqual(got, tc.keys) {
				t.Fatalf("problems at %v (%v), want at %v", got, err, tc.keys)
			}
		})
	}
}

// TestHTTPHardeningKeys: the HTTP port's trusted proxies and connection
// caps come from flags over the file, and bad values are refused by key.
func TestHTTPHardeningKeys(t *testing.T) {
	cfg, err := Parse([]string{"-id", "n1", "-trusted-proxies", "10.0.0.0/8, 127.0.0.1", "-max-conns", "100", "-max-conns-per-ip", "10"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(cfg.TrustedProxies, []string{"10.0.0.0/8", "127.0.0.1"}) || cfg.MaxConns != 100 || cfg.MaxConnsPerIP != 10 {
		t.Fatalf("parsed %q %d %d", cfg.TrustedProxies, cfg.MaxConns, cfg.MaxConnsPerIP)
	}
	for _, tc := range []struct {
		args []string
		key  string
	}{
		{[]string{"-trusted-proxies", "lb.local"}, "trusted_proxies"},
		{[]string{"-max-conns", "10", "-max-conns-per-ip", "11"}, "max_conns_per_ip"},
		{[]string{"-max-conns-per-ip", "-1"}, "max_conns"},
	} {
		_, err := Parse(append([]string{"-id", "n1"}, tc.args...), io.Discard)
		if err == nil || !errors.Is(err, ErrUsage) || !strings.Contains(err.Error(), tc.key+":") {
			t.Errorf("%q: %v; want a usage error under %s", tc.args, err, tc.key)
		}
	}
}

// TestRetentionKeys: retention and log_retention come from the file and the
// flags, default to 720h and 168h, take durations down to a second and
// refuse less.
func TestRetentionKeys(t *testing.T) {
	d := Defaults()
	if d.Retention != 720*time.Hour || d.LogRetention != 168*time.Hour {
		t.Fatalf("defaults %s %s, want 720h 168h", d.Retention, d.LogRetention)
	}
	for _, tc := range []struct {
		retention, logRetention time.Duration
		bad                     string
	}{
		{time.Second, 2 * time.Second, ""},
		{500 * time.Millisecond, time.Hour, "retention"},
		{time.Hour, 0, "log_retention"},
	} {
		c := Defaults()
		c.ID, c.Bootstrap = "n1", true
		c.Retention, c.LogRetention = tc.retention, tc.logRetention
		err := c.Validate()
		if tc.bad == "" && err != nil {
			t.Fatalf("%s/%s refused: %v", tc.retention, tc.logRetention, err)
		}
		if tc.bad != "" && (err == nil || !strings.Contains(err.Error(), tc.bad)) {
			t.Fatalf("%s/%s: err %v, want one naming %s", tc.retention, tc.logRetention, err, tc.bad)
		}
	}
	c, err := Parse([]string{"-id", "n1", "-bootstrap", "-retention", "5s", "-log-retention", "3s"}, io.Discard)
	if err != nil || c.Retention != 5*time.Second || c.LogRetention != 3*time.Second {
		t.Fatalf("flags: %s %s %v", c.Retention, c.LogRetention, err)
	}
}

// TestBucketMetrics: one refresh publishes every bucket's keys and bytes and
// the state file's size, from a real state file.
func TestBucketMetrics(t *testing.T) {
	st, err := fsm.Open(filepath.Join(t.TempDir(), "state.db"), slog.New(slog.NewTextHandler(io.Discard, nil)), fsm.Hooks{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	cmd, err := fsm.EncodeCommand(&fsm.Command{Type: fsm.CmdPush, AtMs: 1, Push: &wire.PushBatch{Edge: "e1", FirstSeq: 1,
		Changes: []wire.Change{{Kind: wire.KindReadings, Device: "d1", Readings: []wire.Reading{
			{TS: 1, ID: "a", Metrics: map[string]float64{"v": 1}}, {TS: 2, ID: "b", Metrics: map[string]float64{"v": 2}}}}}}})
	if err != nil {
		t.Fatal(err)
	}
	st.Apply(&raft.Log{Index: 1, Type: raft.LogCommand, Data: fsm.EncodeEntry([][]byte{cmd})})
	reg := prometheus.NewRegistry()
	m := newBucketMetrics(reg)
	if err := m.refresh(st); err != nil {
		t.Fatal(err)
	}
	// Two readings, staged: small changes wait in readings_recent.
	if got := daemontest.Metric(t, reg, "outpost_cloud_bucket_keys", "bucket", "readings_recent"); got != 2 {
		t.Fatalf("readings_recent keys %v, want 2", got)
	}
	if got := daemontest.Metric(t, reg, "outpost_cloud_bucket_keys", "bucket", "devices"); got != 1 {
		t.Fatalf("devices keys %v, want 1", got)
	}
	if got := daemontest.Metric(t, reg, "outpost_cloud_bucket_bytes", "bucket", "log"); got <= 0 {
		t.Fatalf("log bytes %v, want some", got)
	}
	if got := daemontest.Metric(t, reg, "outpost_cloud_state_file_bytes"); got < 4096 {
		t.Fatalf("state file %v bytes", got)
	}
}

// TestAdmissionKeys: max_queue_delay and admit_wait default to raftnode's,
// come from the file, and are bounded (a wait past a sync request's 10 s
// deadline would leave it no time to commit).
func TestAdmissionKeys(t *testing.T) {
	d, r := Defaults(), raftnode.DefaultConfig()
	if d.MaxQueueDelay != r.MaxQueueDelay || d.AdmitWait != r.AdmitWait || d.MaxQueueDelay == 0 || d.AdmitWait == 0 {
		t.Fatalf("defaults %s %s, raftnode's %s %s", d.MaxQueueDelay, d.AdmitWait, r.MaxQueueDelay, r.AdmitWait)
	}
	path := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(path, []byte("max_queue_delay: 3s\nadmit_wait: 1500ms\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := Parse([]string{"-config", path, "-id", "n1", "-bootstrap"}, io.Discard)
	if err != nil || c.MaxQueueDelay != 3*time.Second || c.AdmitWait != 1500*time.Millisecond {
		t.Fatalf("from the file: %s %s %v", c.MaxQueueDelay, c.AdmitWait, err)
	}
	for _, tc := range []struct {
		delay, wait time.Duration
		bad         string
	}{
		{-time.Second, 0, "max_queue_delay"},
		{2 * time.Minute, 0, "max_queue_delay"},
		{0, 10 * time.Second, "admit_wait"},
		{0, -time.Second, "admit_wait"},
	} {
		c := Defaults()
		c.ID, c.Bootstrap = "n1", true
		c.MaxQueueDelay, c.AdmitWait = tc.delay, tc.wait
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tc.bad+":") {
			t.Errorf("%s/%s: err %v, want one naming %s", tc.delay, tc.wait, err, tc.bad)
		}
	}
}

// leader_heartbeat_timeout is 0 (twice heartbeat_timeout) or between
// heartbeat_timeout and 2.5 times it: a leader heartbeating less often
// could leave a follower unheard for half its wait.
func TestLeaderHeartbeatTimeoutKey(t *testing.T) {
	for _, tc := range []struct {
		leader time.Duration
		ok     bool
	}{
		{0, true},
		{300 * time.Millisecond, true},
		{750 * time.Millisecond, true},
		{299 * time.Millisecond, false},
		{751 * time.Millisecond, false},
	} {
		c := Defaults()
		c.ID, c.Bootstrap = "n1", true
		c.HeartbeatTimeout, c.LeaderHeartbeatTimeout = 300*time.Millisecond, tc.leader
		err := c.Validate()
		if tc.ok != (err == nil) || err != nil && !strings.Contains(err.Error(), "leader_heartbeat_timeout:") {
			t.Errorf("leader_heartbeat_timeout %s: err %v, want ok %v", tc.leader, err, tc.ok)
		}
	}
}
