package httpapi

import (
	"net/http"
	"testing"

	"github.com/outpost-edge/outpost/pkg/cloud/service"
)

// TestAlertsRoutes: edges push alerts with their token (not the service
// token); consumers list and ack with the service token; bad filters,
// cursors and ids are 400, an unknown alert 404.
func TestAlertsRoutes(t *testing.T) {
	f := &fakeService{}
	s := newServer(t, f, Config{})
	body := []byte(`{"alerts":[{"id":"d1~hot~5","rule":"hot","device":"d1","state":"active","started_at":5}]}`)
	call(t, s, http.MethodPost, "/sync/v1/alerts", apiToken, body).wantError(t, 403, "the sync API takes an edge token (-edge-token)")
	if a := call(t, s, http.MethodPost, "/sync/v1/alerts", edgeToken, body); a.status != 200 {
		t.Fatalf("push alerts: %d %s", a.status, a.raw)
	}
	call(t, s, http.MethodGet, "/api/v1/alerts", edgeToken, nil).wantError(t, 403, "the consumer API takes the API token (-api-token)")
	if a := call(t, s, http.MethodGet, "/api/v1/alerts?state=active&edge=e1&device=d1", apiToken, nil); a.status != 200 {
		t.Fatalf("list: %d %s", a.status, a.raw)
	}
	call(t, s, http.MethodGet, "/api/v1/alerts?state=gone", apiToken, nil).wantError(t, 400, "state must be one of: active, acknowledged, cleared")
	call(t, s, http.MethodGet, "/api/v1/alerts?cursor=nope", apiToken, nil).wantError(t, 400, "cursor: malformed; pass next_cursor from the previous page")
	call(t, s, http.MethodPost, "/api/v1/alerts/nope/ack", apiToken, nil).wantError(t, 400, "alert id must be device~rule~ms")
	if a := call(t, s, http.MethodPost, "/api/v1/alerts/d1~hot~5/ack", apiToken, []byte(`{"by":"o-ops"}`)); a.status != 200 {
		t.Fatalf("ack: %d %s", a.status, a.raw)
	}
	f.err = service.ErrNotFound
	call(t, s, http.MethodPost, "/api/v1/alerts/d1~hot~5/ack", apiToken, nil).wantError(t, 404, "alert d1~hot~5 not found")
}
