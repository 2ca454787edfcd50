package lww

import (
	"testing"

	"github.com/outpost-edge/outpost/pkg/hlc"
)

type rec struct {
	stamp hlc.Timestamp
	tags  map[string]string
	list  []string
	val   string
}

func (r rec) LWWStamp() hlc.Timestamp { return r.stamp }
func (r rec) AppendCanonical(b []byte) []byte {
	return AppendJSON(AppendStrings(AppendStringMap(b, r.tags), r.list), []byte(r.val))
}

func TestCompare(t *testing.T) {
	s1, s2 := hlc.New(1, 0), hlc.New(1, 1)
	tests := []struct {
		name string
		a, b rec
		want int
	}{
		{"later stamp wins", rec{stamp: s2}, rec{stamp: s1, val: `9`}, 1},
		{"earlier stamp loses", rec{stamp: s1, val: `9`}, rec{stamp: s2}, -1},
		{"same write", rec{stamp: s1, val: `1`}, rec{stamp: s1, val: `1`}, 0},
		{"nil and empty are the same", rec{stamp: s1, tags: map[string]string{}, list: []string{}}, rec{stamp: s1}, 0},
		{"JSON spelling does not matter", rec{stamp: s1, val: `{ "a" : "<" }`}, rec{stamp: s1, val: `{"a":"\u003c"}`}, 0},
		// The bug the package fixes: these compared differently as JSON of
		// a map and as JSON of a "k=v" list. Any fixed answer is right, as
		// long as it is antisymmetric.
		{"tag tie", rec{stamp: s1, tags: map[string]string{"a": "z"}}, rec{stamp: s1, tags: map[string]string{"a-": "0"}}, -1},
		{"length prefix keeps pieces apart", rec{stamp: s1, list: []string{"ab"}}, rec{stamp: s1, list: []string{"a", "b"}}, -1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := Compare(tc.a, tc.b); sign(got) != tc.want {
				t.Fatalf("Compare = %d, want %d", got, tc.want)
			}
			if got := Compare(tc.b, tc.a); sign(got) != -tc.want {
				t.Fatalf("Compare reversed = %d, want %d", got, -tc.want)
			}
		})
	}
}

func sign(n int) int {
	switch {
	case n > 0:
		return 1
	case n < 0:
		return -1
	}
	return 0
}
