package store

import (
	"encoding/json"
	"testing"
)

// The outbox keeps who made each administrative change and the proof they
// presented, across a restart, for the cloud to verify (edge restriction);
// a change made without an actor stays without one.
func TestOutboxKeepsActorAndProof(t *testing.T) {
	s := openTestStore(t, "", Options{})
	by := Actor{OpenID: "op", Proof: "header.payload.signature"}
	if _, err := s.SetDesiredBy("d1", map[string]json.RawMessage{"mode": json.RawMessage(`"eco"`)}, by); err != nil {
		t.Fatal(err)
	}
	if _, err := s.SetMetaBy("d1", DeviceMeta{Region: "north"}, by); err != nil {
		t.Fatal(err)
	}
	if err := s.PutUserBy(User{OpenID: "u1", Roles: []string{"viewer"}}, by); err != nil {
		t.Fatal(err)
	}
	if _, err := s.SetDesired("d2", map[string]json.RawMessage{"mode": json.RawMessage(`"eco"`)}); err != nil {
		t.Fatal(err)
	}
	s = reopen(t, s)
	out, err := s.Outbox(0, 10, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	state, err := s.PendingState(0, 10)
	if err != nil {
		t.Fatal(err)
	}
	for _, got := range [][]Change{out, state} {
		if len(got) != 4 {
			t.Fatalf("%d changes, want 4", len(got))
		}
		for i, c := range got[:3] {
			if c.By != by {
				t.Fatalf("change %d (%s): actor %+v, want %+v", i, c.Kind, c.By, by)
			}
		}
		if got[3].By != (Actor{}) || got[3].Device != "d2" || got[3].Doc["mode"].Value == nil {
			t.Fatalf("change without an actor: %+v", got[3])
		}
	}
}
