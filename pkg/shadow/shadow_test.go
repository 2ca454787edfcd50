package shadow

import (
	"encoding/json"
	"math/rand"
	"reflect"
	"testing"

	"github.com/outpost-edge/outpost/pkg/hlc"
)

func TestMergeLastWriterWinsPerField(t *testing.T) {
	edge := Patch(map[string]json.RawMessage{"mode": json.RawMessage(`"eco"`), "fan": json.RawMessage(`1`)}, hlc.New(100, 0))
	cloud := Patch(map[string]json.RawMessage{"mode": json.RawMessage(`"boost"`)}, hlc.New(90, 0))
	cloud.Set("fan", nil, hlc.New(120, 0)) // cloud deleted fan later

	a := edge.Clone()
	a.Merge(cloud)
	b := cloud.Clone()
	b.Merge(edge)
	if !reflect.DeepEqual(a, b) {
		t.Fatalf("merge not commutative:\n%v\n%v", a, b)
	}
	st := a.State()
	if string(st["mode"]) != `"eco"` {
		t.Fatalf("mode = %s, want the later edge write", st["mode"])
	}
	if _, ok := st["fan"]; ok {
		t.Fatal("fan should be deleted by the later tombstone")
	}
	// An older write cannot resurrect the tombstone.
	a.Set("fan", json.RawMessage(`2`), hlc.New(110, 0))
	if _, ok := a.State()["fan"]; ok {
		t.Fatal("older write resurrected a deleted field")
	}
}

func TestEqualStampsTieBreakDeterministic(t *testing.T) {
	x := Doc{"k": {Value: json.RawMessage(`"a"`), Stamp: hlc.New(5, 0)}}
	y := Doc{"k": {Value: json.RawMessage(`"b"`), Stamp: hlc.New(5, 0)}}
	a, b := x.Clone(), y.Clone()
	a.Merge(y)
	b.Merge(x)
	if !reflect.DeepEqual(a, b) {
		t.Fatalf("tie broken differently: %v vs %v", a, b)
	}
}

// TestMergeOrderIndependent is the property test: any order and duplication
// of the same updates yields the same document.
func TestMergeOrderIndependent(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	fields := []string{"a", "b", "c", "d"}
	for iter := 0; iter < 500; iter++ {
		var updates []Doc
		for i := 0; i < 1+rng.Intn(12); i++ {
			u := Doc{}
			f := fields[rng.Intn(len(fields))]
			stamp := hlc.New(int64(rng.Intn(20)), uint16(rng.Intn(3)))
			if rng.Intn(4) == 0 {
				u[f] = Field{Stamp: stamp, Deleted: true}
			} else {
				v, _ := json.Marshal(rng.Intn(5))
				u[f] = Field{Value: v, Stamp: stamp}
			}
			updates = append(updates, u)
		}
		want := Doc{}
		for _, u := range updates {
			want.Merge(u)
		}
		for perm := 0; perm < 5; perm++ {
			got := Doc{}
			order := rng.Perm(len(updates))
			for _, i := range order {
				got.Merge(updates[i])
				if rng.Intn(3) == 0 {
					got.Merge(updates[i]) // duplicate delivery
				}
			}
			// Merging partial merges (as replicas exchanging state do).
			half := Doc{}
			for _, i := range order[:len(order)/2] {
				half.Merge(updates[i])
			}
			got.Merge(half)
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("iteration %d: order %v gave %v, want %v", iter, order, got, want)
			}
		}
	}
}

func TestSinceAndPurge(t *testing.T) {
	d := Doc{}
	d.Set("a", json.RawMessage(`1`), hlc.New(10, 0))
	d.Set("b", nil, hlc.New(20, 0))
	d.Set("c", json.RawMessage(`3`), hlc.New(30, 0))
	if got := d.Since(hlc.New(15, 0)); len(got) != 2 {
		t.Fatalf("Since returned %v", got)
	}
	if d.Version() != hlc.New(30, 0) {
		t.Fatalf("version %s", d.Version())
	}
	if n := d.PurgeTombstones(hlc.New(25, 0)); n != 1 || len(d) != 2 {
		t.Fatalf("purged %d, left %v", n, d)
	}
}
