package api

import (
	"net/http"
	"testing"

	"github.com/outpost-edge/outpost/pkg/store"
)

// Every administrative write queues, with its change, the caller and the
// access token they presented: the proof the cloud verifies before it
// accepts the change (edge restriction, issue 11).
func TestWritesRecordTheirProof(t *testing.T) {
	e := newEnv(t)
	tok := e.token("root")
	e.expect(req{method: http.MethodPut, path: "/api/v1/devices/d1/desired", token: tok, body: map[string]any{"state": map[string]any{"mode": "eco"}}}, 200)
	e.expect(req{method: http.MethodPut, path: "/api/v1/devices/d1/meta", token: tok, body: map[string]any{"region": "north"}}, 200)
	e.expect(req{method: http.MethodPut, path: "/api/v1/users/o1", token: tok, body: map[string]any{"roles": []string{"viewer"}}}, 200)
	changes, err := e.store.PendingState(0, 100)
	if err != nil {
		t.Fatal(err)
	}
	want := store.Actor{OpenID: "root", Proof: tok}
	n := 0
	for _, c := range changes {
		switch c.Kind {
		case store.ChangeDesired, store.ChangeMeta, store.ChangeUser:
			n++
			if c.By != want {
				t.Fatalf("%s change recorded actor %+v, want root and the presented token", c.Kind, c.By)
			}
		}
	}
	if n != 3 {
		t.Fatalf("%d administrative changes queued, want 3", n)
	}
}
