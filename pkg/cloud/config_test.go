package cloud

import (
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"

	"github.com/outpost-edge/outpost/pkg/cloud/raftnode"
	"github.com/outpost-edge/outpost/pkg/cloud/sinks"
	"github.com/outpost-edge/outpost/pkg/config"
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
