package store

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/shadow"
)

func openSyncStore(t *testing.T, clock *hlc.Clock) *Store {
	t.Helper()
	s, err := Open(filepath.Join(t.TempDir(), "edge.db"), Options{EdgeID: "e", Region: "r", Clock: clock, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// The edge applies pulled changes through the same last-writer-wins merge as
// the cloud: any order and duplication of the same remote changes gives the
// same desired state, meta and users.
func TestApplyRemoteOrderIndependent(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	base := time.Now().Add(-time.Hour).UnixMilli()
	for iter := 0; iter < 40; iter++ {
		var changes []Change
		for i := 0; i < 1+rng.IntN(15); i++ {
			stamp := hlc.New(base+int64(rng.IntN(50)), uint16(rng.IntN(3)))
			dev := fmt.Sprintf("d%d", rng.IntN(2))
			switch rng.IntN(3) {
			case 0:
				v, _ := json.Marshal(rng.IntN(5))
				f := shadow.Field{Value: v, Stamp: stamp}
				if rng.IntN(4) == 0 {
					f = shadow.Field{Stamp: stamp, Deleted: true}
				}
				changes = append(changes, Change{Kind: ChangeDesired, Device: dev, Doc: shadow.Doc{fmt.Sprintf("f%d", rng.IntN(3)): f}})
			case 1:
				changes = append(changes, Change{Kind: ChangeMeta, Device: dev, Meta: &DeviceMeta{Region: fmt.Sprintf("r%d", rng.IntN(3)), Owners: []string{}, Tags: map[string]string{}, Stamp: stamp}})
			default:
				changes = append(changes, Change{Kind: ChangeUser, Device: "u", User: &User{OpenID: "u", Roles: []string{fmt.Sprint(rng.IntN(3))}, Regions: []string{}, Stamp: stamp}})
			}
		}
		snapshot := func(order []int, dup bool) string {
			s := openSyncStore(t, hlc.NewClock(nil, 5*time.Minute))
			for _, i := range order {
				batch := []Change{changes[i]}
				if dup && rng.IntN(3) == 0 {
					batch = append(batch, changes[i])
				}
				if _, err := s.ApplyRemote(batch); err != nil {
					t.Fatal(err)
				}
			}
			out := map[string]any{}
			for _, id := range []string{"d0", "d1"} {
				if d, err := s.Device(id); err == nil {
					out[id] = []any{d.Desired, d.Meta.Region, d.Meta.Stamp}
				}
			}
			if u, err := s.User("u"); err == nil {
				out["u"] = u.Roles
			}
			b, _ := json.Marshal(out)
			return string(b)
		}
		inOrder := make([]int, len(changes))
		for i := range inOrder {
			inOrder[i] = i
		}
		want := snapshot(inOrder, false)
		for perm := 0; perm < 3; perm++ {
			if got := snapshot(rng.Perm(len(changes)), true); !reflect.DeepEqual(got, want) {
				t.Fatalf("iteration %d: %s, want %s", iter, got, want)
			}
		}
	}
}

// Pulled changes never echo into the outbox, and stamps beyond the drift
// bound are rejected and counted.
func TestApplyRemoteNoEchoAndDrift(t *testing.T) {
	s := openSyncStore(t, hlc.NewClock(nil, time.Minute))
	now := time.Now()
	ok := hlc.New(now.Add(-time.Second).UnixMilli(), 0)
	ahead := hlc.New(now.Add(time.Hour).UnixMilli(), 0)
	res, err := s.ApplyRemote([]Change{
		{Kind: ChangeDesired, Device: "d", Doc: shadow.Doc{"a": {Value: json.RawMessage(`1`), Stamp: ok}, "b": {Value: json.RawMessage(`2`), Stamp: ahead}}},
		{Kind: ChangeUser, Device: "u", User: &User{OpenID: "u", Roles: []string{"admin"}, Stamp: ahead}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(res) != 2 || res[0].Rejected != 1 || !res[0].Changed || res[1].Rejected != 1 || res[1].Changed {
		t.Fatalf("results %+v, want one field and the user rejected", res)
	}
	d, err := s.Device("d")
	if err != nil {
		t.Fatal(err)
	}
	if _, has := d.Desired["b"]; has || string(d.Desired["a"].Value) != "1" {
		t.Fatalf("desired %v, want only a", d.Desired)
	}
	if _, err := s.User("u"); err == nil {
		t.Fatal("a user stamped beyond drift was stored")
	}
	if c := s.Counts(); c.OutboxHead != 0 {
		t.Fatalf("outbox head %d after remote changes, want 0 (no echo)", c.OutboxHead)
	}
	if s.clock.Last() < ok {
		t.Fatal("clock did not advance past an accepted remote stamp")
	}
}

// PendingState lists state changes ahead of readings, and acks drop them.
func TestPendingState(t *testing.T) {
	s := openSyncStore(t, hlc.NewClock(nil, 0))
	if _, err := s.Ingest([]Item{{Device: "d", ReceivedAt: 1, Readings: []Reading{{TS: 1, Metrics: []Metric{{Name: "t", Value: 1}}}}}}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.SetDesired("d", map[string]json.RawMessage{"m": json.RawMessage(`1`)}); err != nil {
		t.Fatal(err)
	}
	ps, err := s.PendingState(0, 10)
	if err != nil || len(ps) != 1 || ps[0].Seq != 2 || ps[0].Kind != ChangeDesired {
		t.Fatalf("PendingState = %+v, %v; want the desired change at seq 2", ps, err)
	}
	if err := s.AckOutbox(2); err != nil {
		t.Fatal(err)
	}
	if ps, _ := s.PendingState(0, 10); len(ps) != 0 {
		t.Fatalf("PendingState after ack = %+v", ps)
	}
}
