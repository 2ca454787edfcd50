package syncer

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/outpost-edge/outpost/pkg/cloud/client"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// fakeCloud serves h as the cloud and returns the edge's client for it: one
// round of retries, bodies uncompressed (h reads them as JSON).
func fakeCloud(t *testing.T, h http.HandlerFunc) *client.Client {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	cl, err := client.New([]string{srv.URL}, "tok", client.WithRounds(1), client.WithoutCompression())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return cl
}

// answer writes data as the envelope of a successful answer.
func answer(w http.ResponseWriter, data any) {
	raw, _ := json.Marshal(data)
	_ = json.NewEncoder(w).Encode(wire.Envelope[json.RawMessage]{Code: 200, Message: "ok", Data: raw})
}
