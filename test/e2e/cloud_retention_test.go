package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/pkg/wire"
)

// A cloud-sync node with second-long retention deletes readings older than
// retention (and keeps newer ones and the device record), compacts its
// export log, and answers an export consumer whose cursor fell before what it
// keeps with 410 Gone naming the earliest cursor kept, from which export then
// resumes.
func TestCloudRetention(t *testing.T) {
	c := startCloudCluster(t, 1, cloudWithArgs("-retention", "2s", "-log-retention", "1s"))
	n := c.Nodes[0]
	ctx := cloudCtx(t, 30*time.Second)
	now := time.Now()
	// The fresh reading is an hour ahead: it stays however slowly the test runs.
	b := &wire.PushBatch{Edge: "e0", FirstSeq: 1, Changes: []wire.Change{{Kind: wire.KindReadings, Device: "dev-r",
		Readings: []wire.Reading{
			{TS: now.Add(-time.Hour).UnixMilli(), ID: "old", Metrics: map[string]float64{"v": 1}},
			{TS: now.Add(time.Hour).UnixMilli(), ID: "fresh", Metrics: map[string]float64{"v": 2}},
		}}}}
	if _, err := cloudPushUntilAcked(ctx, c.edgeClient("e0"), b); err != nil {
		t.Fatal(err)
	}
	readingIDs := func() []string {
		code, env, err := c.api(n, http.MethodGet, "/api/v1/devices/dev-r/readings?limit=10", nil)
		if err != nil || code != 200 {
			return nil
		}
		var page struct {
			Items []struct {
				ID string `json:"id"`
			} `json:"items"`
		}
		_ = json.Unmarshal(env.Data, &page)
		var ids []string
		for _, it := range page.Items {
			ids = append(ids, it.ID)
		}
		return ids
	}
	export := func(since string) (int, string, string) {
		req, _ := http.NewRequest(http.MethodGet, n.URL()+"/api/v1/export?since="+since, nil)
		req.Header.Set("Authorization", "Bearer "+cloudAPIToken)
		resp, err := c.hc.Do(req)
		if err != nil {
			return 0, "", err.Error()
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, resp.Header.Get("X-Outpost-Earliest-Cursor"), string(body)
	}
	cloudWaitFor(t, 20*time.Second, "the old reading deleted, the fresh one kept", func() bool {
		ids := readingIDs()
		return len(ids) == 1 && ids[0] == "fresh"
	})
	if code, _, err := c.api(n, http.MethodGet, "/api/v1/devices/dev-r", nil); err != nil || code != 200 {
		t.Fatalf("the device record went with its readings: %d %v", code, err)
	}
	var earliest, body string
	cloudWaitFor(t, 20*time.Second, "an export from the start refused as compacted", func() bool {
		var code int
		code, earliest, body = export("0.0")
		return code == http.StatusGone
	})
	var env cloudEnvelope
	_ = json.Unmarshal([]byte(body), &env)
	if earliest == "" || !strings.Contains(env.Message, fmt.Sprintf("earliest available cursor is %q", earliest)) {
		t.Fatalf("410 names earliest %q, body %s", earliest, body)
	}
	if code, _, body := export(earliest); code != 200 {
		t.Fatalf("export from the earliest cursor %q: %d %s", earliest, code, body)
	}
}
