package cloud

import (
	"reflect"
	"testing"

	"github.com/outpost-edge/outpost/pkg/cloud/raftnode"
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
