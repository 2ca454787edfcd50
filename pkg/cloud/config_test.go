package cloud

import (
	"errors"
	"io"
	"reflect"
	"strings"
	"testing"

	"github.com/outpost-edge/outpost/pkg/cloud/raftnode"
	"github.com/outpost-edge/outpost/pkg/config"
)

// TestShippedConfigIsTheDefaults: configs/cloud-sync.yaml shows the
// built-in defaults, and the raft ones are raftnode's (their one source):
// loading the file over Defaults changes nothing but the development
// settings it deliberately sets. The snapshot settings once disagreed
// (30s/2048/1024 here, 60s/8192/10240 in raftnode); this fails if they do
// again.
func TestShippedConfigIsTheDefaults(t *testing.T) {
	got := Defaults()
	if err := config.LoadYAML("../../configs/cloud-sync.yaml", &got); err != nil {
		t.Fatal(err)
	}
	want := Defaults()
	want.ID, want.Bootstrap, want.Join, want.Admins, want.RaftDial = "node1", true, []string{}, []string{}, map[string]string{}
	want.EdgeTokens = map[string]string{"edge-1": "dev-edge-1-token-change-me"}
	want.APIToken = "dev-api-token-change-me"
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("configs/cloud-sync.yaml differs from the defaults:\n file %+v\n code %+v", got, want)
	}
	r := raftnode.DefaultConfig()
	if got.SnapshotInterval != r.SnapshotInterval || got.SnapshotThreshold != r.SnapshotThreshold || got.TrailingLogs != r.TrailingLogs {
		t.Fatalf("snapshots %s/%d/%d in the config, %s/%d/%d in raftnode", got.SnapshotInterval, got.SnapshotThreshold,
			got.TrailingLogs, r.SnapshotInterval, r.SnapshotThreshold, r.TrailingLogs)
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
