package syncer

import (
	"encoding/json"
	"reflect"
	"testing"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/shadow"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Outbox entries survive the trip to the wire and back (what the cloud sends
// back to other edges): meta tags, users and docs.
func TestWireRoundTrip(t *testing.T) {
	stamp := hlc.New(1700000000000, 3)
	tests := []store.Change{
		{Kind: store.ChangeDesired, Device: "d1", Doc: shadow.Doc{"m": {Value: json.RawMessage(`"eco"`), Stamp: stamp}}},
		{Kind: store.ChangeMeta, Device: "d1", Meta: &store.DeviceMeta{Owners: []string{"u1"}, Region: "r1",
			Tags: map[string]string{"floor": "3", "kind": "a=b"}, Stamp: stamp}},
		{Kind: store.ChangeUser, Device: "u1", User: &store.User{OpenID: "u1", Roles: []string{"admin"}, Regions: []string{"r1"}, Stamp: stamp}},
	}
	for _, c := range tests {
		t.Run(c.Kind.String(), func(t *testing.T) {
			w := toWire(&c)
			if err := w.Validate(); err != nil {
				t.Fatalf("wire form invalid: %v", err)
			}
			raw, _ := json.Marshal(w)
			var back wire.Change
			if err := json.Unmarshal(raw, &back); err != nil {
				t.Fatal(err)
			}
			got, ok := fromWire(&back)
			if !ok {
				t.Fatal("fromWire refused its own output")
			}
			if !reflect.DeepEqual(got.Doc, c.Doc) || !reflect.DeepEqual(got.Meta, c.Meta) || !reflect.DeepEqual(got.User, c.User) || got.Device != c.Device {
				t.Fatalf("round trip: got %+v, want %+v", got, c)
			}
		})
	}
}

// The API ranks the directory the syncer last pulled; the syncer hands out
// a copy, so a pull replacing it does not race the ranking.
func TestEdgesFromDirectory(t *testing.T) {
	s := &Syncer{cfg: Config{EdgeID: "self"}}
	s.dir = []wire.Edge{{ID: "a", Healthy: true}, {ID: "b"}}
	got, err := s.Edges(t.Context())
	if err != nil || !reflect.DeepEqual(got, s.dir) {
		t.Fatalf("Edges = %v, %v", got, err)
	}
	got[0].ID = "changed"
	if s.dir[0].ID != "a" {
		t.Fatal("Edges returned the syncer's own slice")
	}
}
