package e2e

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/pkg/store"
)

// resyncDevice is the part of a device both an edge and a cloud node show.
type resyncDevice struct {
	EdgeID  string                     `json:"edge_id"`
	Region  string                     `json:"region"`
	Owners  []string                   `json:"owners"`
	Tags    map[string]string          `json:"tags"`
	Desired map[string]json.RawMessage `json:"desired"`
}

// An edge away longer than the maximum offline window re-pulls everything
// from the cloud (full resync) and ends with the cloud's state: desired
// state, device meta and users written in the cloud meanwhile, and a field
// the cloud deleted meanwhile stays deleted (its tombstone wins over the
// edge's older value, at the edge and at the cloud). Before that, a
// conflicting write made at the edge during a partition loses to the
// cloud's newer one, which the cloud counts as a resolved conflict.
func TestSyncFullResyncAfterMaxOffline(t *testing.T) {
	const maxOffline = 3 * time.Second
	cfgFile := filepath.Join(t.TempDir(), "edge.yaml")
	if err := os.WriteFile(cfgFile, []byte("cloud:\n  max_offline: 3s\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c := startCloudCluster(t, 1, cloudWithUsers())
	n := c.Nodes[0]
	link := newSyncLink(t, c)
	e := startSyncEdge(t, "e2", link, "-config", cfgFile)
	admin := e.login()

	cloudPut := func(path string, body any) {
		t.Helper()
		if code, env, err := c.api(n, http.MethodPut, path, body); err != nil || code != 200 {
			t.Fatalf("PUT %s at the cloud: %d %s %v", path, code, env.Message, err)
		}
	}
	edgeDevice := func() (resyncDevice, error) {
		var d resyncDevice
		err := e.api(http.MethodGet, "/api/v1/devices/d1", admin, nil, &d)
		return d, err
	}
	cloudDevice := func() (resyncDevice, error) {
		var d resyncDevice
		code, env, err := c.api(n, http.MethodGet, "/api/v1/devices/d1", nil)
		if err == nil && code == 200 {
			err = json.Unmarshal(env.Data, &d)
		}
		return d, err
	}

	// d1 appears at e2, which becomes its home edge.
	bulkPublish(t, e, "d1", 0, 1, 1)
	cloudWaitFor(t, 20*time.Second, "d1 homed at e2 in the cloud", func() bool {
		d, err := cloudDevice()
		return err == nil && d.EdgeID == "e2"
	})
	cloudPut("/api/v1/devices/d1/desired", map[string]any{"state": map[string]any{"a": 1, "b": 2}})
	cloudPut("/api/v1/devices/d1/meta", map[string]any{"owners": []string{"o-x"}, "region": "north"})
	cloudPut("/api/v1/users/o-ops", map[string]any{"roles": []string{"viewer"}})
	cloudWaitFor(t, 20*time.Second, "the cloud's writes at the edge", func() bool {
		d, err := edgeDevice()
		return err == nil && len(d.Desired) == 2 && d.Region == "north"
	})

	// A conflict: the edge writes "mode" during a partition, the cloud
	// writes it later; the edge's older write loses at the cloud.
	// Made with a cloud-issued token, the proof the cloud accepts it on.
	proof := edgeTrusts(t, c, e, "admin", "d1")
	link.cut(true)
	if err := e.api(http.MethodPut, "/api/v1/devices/d1/desired", proof, map[string]any{"state": map[string]any{"mode": "edge"}}, nil); err != nil {
		t.Fatal(err)
	}
	cloudPut("/api/v1/devices/d1/desired", map[string]any{"state": map[string]any{"mode": "cloud"}})
	link.cut(false)
	cloudWaitFor(t, 20*time.Second, "the conflict resolved and counted at the cloud", func() bool {
		d, err := edgeDevice()
		v, ok := c.labelled(n, "outpost_cloud_conflicts_resolved_total")
		return err == nil && jsonEqual(d.Desired["mode"], []byte(`"cloud"`)) && ok && v >= 1
	})

	// The edge goes away; the cloud deletes a field, adds one, changes the
	// meta and a user's roles.
	e.kill9()
	stopped := time.Now()
	cloudPut("/api/v1/devices/d1/desired", map[string]any{"state": map[string]any{"a": nil, "c": 3}})
	cloudPut("/api/v1/devices/d1/meta", map[string]any{"owners": []string{"o-y"}, "region": "south", "tags": map[string]string{"floor": "3"}})
	cloudPut("/api/v1/users/o-ops", map[string]any{"roles": []string{"admin"}})
	// The condition is wall time itself: the edge's last pull must be older
	// than its maximum offline window when it comes back.
	time.Sleep(time.Until(stopped.Add(maxOffline + 300*time.Millisecond)))

	e.start()
	want, err := cloudDevice()
	if err != nil {
		t.Fatal(err)
	}
	if _, resurrected := want.Desired["a"]; resurrected || len(want.Desired) != 3 {
		t.Fatalf("cloud desired %s, want b, c and mode", want.Desired)
	}
	if want.Tags["floor"] != "3" {
		t.Fatalf("cloud tags %v, want the object written", want.Tags)
	}
	admin = e.login()
	cloudWaitFor(t, 20*time.Second, "the edge holds the cloud's state after the resync", func() bool {
		d, err := edgeDevice()
		return err == nil && sameDesired(d.Desired, want.Desired) && d.Region == "south" && slices.Equal(d.Owners, []string{"o-y"}) && d.Tags["floor"] == "3"
	})
	if v, ok := e.metric("outpost_sync_full_resyncs_total"); !ok || v < 1 {
		t.Errorf("outpost_sync_full_resyncs_total = %v (%v), want >= 1", v, ok)
	}
	// The user's new role arrived: o-ops may now write users at the edge.
	var ops syncPair
	if err := e.api(http.MethodPost, "/api/v1/auth/login", "", map[string]string{"code": "dev:o-ops"}, &ops); err != nil {
		t.Fatal(err)
	}
	cloudWaitFor(t, 10*time.Second, "o-ops holds the admin role at the edge", func() bool {
		code, _, err := e.rawCall(http.MethodPut, "/api/v1/users/o-z", ops.AccessToken, map[string]any{"roles": []string{"viewer"}})
		return err == nil && code == 200
	})
	// The edge's state went back to the cloud without resurrecting "a".
	cloudWaitFor(t, 10*time.Second, "edge and cloud agree", func() bool {
		d, err := cloudDevice()
		return err == nil && sameDesired(d.Desired, want.Desired)
	})
}

// An edge whose stored pull cursor the cloud refuses (400: not one it
// issued, as after the cloud's state was rebuilt) re-pulls everything from
// an empty cursor (full resync) instead of stalling, ends with the cloud's
// state, including what the cloud wrote while the edge was away, and then
// follows deltas from the new cursor it stored.
func TestSyncRefusedPullCursorFullResync(t *testing.T) {
	c := startCloudCluster(t, 1, cloudWithUsers())
	n := c.Nodes[0]
	link := newSyncLink(t, c)
	e := startSyncEdge(t, "e3", link)
	admin := e.login()
	cloudPut := func(path string, body any) {
		t.Helper()
		if code, env, err := c.api(n, http.MethodPut, path, body); err != nil || code != 200 {
			t.Fatalf("PUT %s at the cloud: %d %s %v", path, code, env.Message, err)
		}
	}
	edgeDesired := func() map[string]json.RawMessage {
		var d resyncDevice
		if err := e.api(http.MethodGet, "/api/v1/devices/d1", admin, nil, &d); err != nil {
			return nil
		}
		return d.Desired
	}

	bulkPublish(t, e, "d1", 0, 1, 1)
	cloudWaitFor(t, 20*time.Second, "d1 homed at e3 in the cloud", func() bool {
		d, err := c.deviceState(n, "d1")
		return err == nil && d.EdgeID == "e3"
	})
	cloudPut("/api/v1/devices/d1/desired", map[string]any{"state": map[string]any{"a": 1}})
	cloudWaitFor(t, 20*time.Second, "a at the edge", func() bool { return len(edgeDesired()) == 1 })
	// The edge stores its cursor after applying a page: once a later write
	// arrived, the pull that brought a has stored its cursor.
	cloudPut("/api/v1/devices/d1/desired", map[string]any{"state": map[string]any{"z": 0}})
	cloudWaitFor(t, 20*time.Second, "z at the edge", func() bool { return len(edgeDesired()) == 2 })

	// The edge stops; its stored cursor becomes one the cloud never issued.
	e.kill9()
	st, err := store.Open(filepath.Join(e.dataDir, "edge.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if cur, err := st.SyncValue("pull_cursor"); err != nil || len(cur) == 0 {
		t.Fatalf("the edge stored no pull cursor (%q, %v): the test would not exercise a refused one", cur, err)
	}
	if err := st.SetSyncValues(map[string][]byte{"pull_cursor": []byte("not-a-cursor-the-cloud-issued")}); err != nil {
		t.Fatal(err)
	}
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	cloudPut("/api/v1/devices/d1/desired", map[string]any{"state": map[string]any{"b": 2}})

	e.start()
	admin = e.login()
	cloudWaitFor(t, 20*time.Second, "a and b at the edge after the resync", func() bool {
		d := edgeDesired()
		return jsonEqual(d["a"], []byte("1")) && jsonEqual(d["b"], []byte("2"))
	})
	if v, ok := e.metric("outpost_sync_full_resyncs_total"); !ok || v < 1 {
		t.Fatalf("outpost_sync_full_resyncs_total = %v (%v), want >= 1", v, ok)
	}
	if !strings.Contains(e.log.String(), "cloud refused the pull cursor; full resync") {
		t.Fatal("the edge did not log the refused cursor")
	}
	// The new cursor is one the cloud accepts: the next write arrives as a
	// delta, without another resync.
	resyncs, _ := e.metric("outpost_sync_full_resyncs_total")
	cloudPut("/api/v1/devices/d1/desired", map[string]any{"state": map[string]any{"c": 3}})
	cloudWaitFor(t, 20*time.Second, "c at the edge", func() bool { return jsonEqual(edgeDesired()["c"], []byte("3")) })
	if v, _ := e.metric("outpost_sync_full_resyncs_total"); v != resyncs {
		t.Fatalf("full resyncs went from %v to %v after the cursor was replaced", resyncs, v)
	}
}
