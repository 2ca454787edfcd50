package wire

import (
	"errors"
	"testing"
)

func TestSetVersionsRoundTrip(t *testing.T) {
	tests := []struct {
		name string
		v    SetVersions
		enc  string
	}{
		{"none", SetVersions{}, ""},
		{"all", SetVersions{Directory: "Ab-_.3", Policies: "9f0e", Keys: "k1", Rules: "r2"}, "dir:Ab-_.3,policies:9f0e,keys:k1,rules:r2"},
		{"some", SetVersions{Keys: "k1"}, "keys:k1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.v.Encode(); got != tt.enc {
				t.Fatalf("Encode = %q, want %q", got, tt.enc)
			}
			back, err := ParseSetVersions(tt.enc)
			if err != nil || back != tt.v {
				t.Fatalf("Parse(%q) = %+v, %v", tt.enc, back, err)
			}
		})
	}
	// A set this side does not know (a newer edge's) is ignored.
	if v, err := ParseSetVersions("alarms:7,keys:k"); err != nil || v != (SetVersions{Keys: "k"}) {
		t.Fatalf("unknown set: %+v %v", v, err)
	}
	for _, bad := range []string{"dir", "dir:a b", "keys:" + string(make([]byte, 65)), "dir:a,keys"} {
		if _, err := ParseSetVersions(bad); !errors.Is(err, ErrBadParam) {
			t.Errorf("Parse(%q): err = %v, want ErrBadParam", bad, err)
		}
	}
}

func TestDirectoryDeltaApply(t *testing.T) {
	dir := []Edge{{ID: "a", Region: "1"}, {ID: "b", Region: "1"}, {ID: "c", Region: "1"}}
	d := DirectoryDelta{Edges: []Edge{{ID: "b", Region: "2"}, {ID: "d", Region: "2"}}, Removed: []string{"c"}}
	got := d.Apply(dir)
	want := []Edge{{ID: "a", Region: "1"}, {ID: "b", Region: "2"}, {ID: "d", Region: "2"}}
	if len(got) != len(want) {
		t.Fatalf("Apply = %+v", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("Apply = %+v, want %+v", got, want)
		}
	}
	// Applying it again gives the same; a full one replaces.
	if again := d.Apply(got); len(again) != 3 || again[1].Region != "2" {
		t.Fatalf("Apply twice = %+v", again)
	}
	full := DirectoryDelta{Full: true, Edges: []Edge{{ID: "z"}}}
	if got := full.Apply(dir); len(got) != 1 || got[0].ID != "z" {
		t.Fatalf("full Apply = %+v", got)
	}
}
