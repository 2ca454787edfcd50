package httpapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/pkg/cloud/sinks"
)

type fakeSinks struct {
	items  []sinks.Status
	err    error
	forget error
}

func (f fakeSinks) Status() ([]sinks.Status, error)          { return f.items, f.err }
func (f fakeSinks) Forget(_ context.Context, _ string) error { return f.forget }

// TestSinksRoute: GET /api/v1/sinks needs the service token, answers the
// envelope with this node's id and each sink's status (an empty list when
// none are configured), refuses an unknown consistency, and on a follower
// without a reachable leader answers 503 unless asked for the local view.
func TestSinksRoute(t *testing.T) {
	st := sinks.Status{Name: "js", Type: "nats", Target: "nats://h:4222/s", Cursor: 7, Active: true,
		LagEntries: 2, LagRecords: 5, LagExact: true, LastError: "connection refused", LastErrorAt: 99}
	type body struct {
		Node  string         `json:"node"`
		Items []sinks.Status `json:"items"`
	}
	for _, tc := range []struct {
		name   string
		f      *fakeService
		cfg    Config
		path   string
		token  string
		status int
		want   []sinks.Status
	}{
		{"no token", &fakeService{}, Config{Sinks: fakeSinks{items: []sinks.Status{st}}}, "/api/v1/sinks", "", 401, nil},
		{"edge token", &fakeService{}, Config{Sinks: fakeSinks{items: []sinks.Status{st}}}, "/api/v1/sinks", edgeToken, 403, nil},
		{"leader", &fakeService{}, Config{Sinks: fakeSinks{items: []sinks.Status{st}}}, "/api/v1/sinks", apiToken, 200, []sinks.Status{st}},
		{"none configured", &fakeService{}, Config{}, "/api/v1/sinks", apiToken, 200, []sinks.Status{}},
		{"status fails", &fakeService{}, Config{Sinks: fakeSinks{err: errors.New("disk")}}, "/api/v1/sinks", apiToken, 500, nil},
		{"bad consistency", &fakeService{}, Config{}, "/api/v1/sinks?consistency=eventual", apiToken, 400, nil},
		{"follower, local view", &fakeService{follower: true}, Config{Sinks: fakeSinks{items: []sinks.Status{st}}},
			"/api/v1/sinks?consistency=local", apiToken, 200, []sinks.Status{st}},
		{"follower without a leader", &fakeService{follower: true}, Config{Sinks: fakeSinks{items: []sinks.Status{st}}, ForwardTimeout: 50 * time.Millisecond},
			"/api/v1/sinks", apiToken, 503, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newServer(t, tc.f, tc.cfg)
			a := call(t, s, "GET", tc.path, tc.token, nil)
			if a.status != tc.status {
				t.Fatalf("%d %s, want %d", a.status, a.raw, tc.status)
			}
			if tc.want == nil {
				return
			}
			var b body
			if err := json.Unmarshal(a.env.Data, &b); err != nil {
				t.Fatal(err)
			}
			got, _ := json.Marshal(b.Items)
			want, _ := json.Marshal(tc.want)
			if b.Node != "n1" || string(got) != string(want) {
				t.Fatalf("node %s items %s, want %s", b.Node, got, want)
			}
		})
	}
}

// TestForgetSinkRoute: DELETE /api/v1/sinks/{name} maps the manager's
// answers: removed, 404 for no such cursor, 409 for a configured sink, 503
// with Retry-After for an unknown outcome.
func TestForgetSinkRoute(t *testing.T) {
	for _, tc := range []struct {
		name   string
		cfg    Config
		token  string
		status int
	}{
		{"removed", Config{Sinks: fakeSinks{}}, apiToken, 200},
		{"needs the service token", Config{Sinks: fakeSinks{}}, edgeToken, 403},
		{"no such cursor", Config{Sinks: fakeSinks{forget: fmt.Errorf("%w: x", sinks.ErrUnknownSink)}}, apiToken, 404},
		{"no sinks at all", Config{}, apiToken, 404},
		{"configured", Config{Sinks: fakeSinks{forget: sinks.ErrSinkConfigured}}, apiToken, 409},
		{"outcome unknown", Config{Sinks: fakeSinks{forget: errors.New("leadership lost")}}, apiToken, 503},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := call(t, newServer(t, &fakeService{}, tc.cfg), "DELETE", "/api/v1/sinks/old", tc.token, nil)
			if a.status != tc.status {
				t.Fatalf("%d %s, want %d", a.status, a.raw, tc.status)
			}
		})
	}
}
