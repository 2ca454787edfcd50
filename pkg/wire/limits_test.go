package wire

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
)

func TestValidateState(t *testing.T) {
	raw := func(s string) json.RawMessage { return json.RawMessage(s) }
	many := map[string]json.RawMessage{}
	for i := range MaxStateFields + 1 {
		many[strings.Repeat("f", 1+i%100)+string(rune('a'+i%26))+string(rune('a'+i/26))] = raw(`1`)
	}
	tests := []struct {
		name  string
		state map[string]json.RawMessage
		want  error
		msg   string
	}{
		{"ok", map[string]json.RawMessage{"a": raw(`{"x":1}`), "b": raw(`null`)}, nil, ""},
		{"empty", nil, ErrInvalid, "at least one field"},
		{"empty name", map[string]json.RawMessage{"": raw(`1`)}, ErrInvalid, "must be 1 to 128 bytes"},
		{"long name", map[string]json.RawMessage{strings.Repeat("n", MaxFieldName+1): raw(`1`)}, ErrInvalid, "must be 1 to 128 bytes"},
		{"too many fields", many, ErrInvalid, "at most 256 allowed"},
		{"not JSON", map[string]json.RawMessage{"a": raw(`{`)}, ErrInvalid, "not valid JSON"},
		{"value at the limit", map[string]json.RawMessage{"a": raw(`"` + strings.Repeat("v", MaxValueBytes-2) + `"`)}, nil, ""},
		{"value over the limit", map[string]json.RawMessage{"a": raw(`"` + strings.Repeat("v", MaxValueBytes-1) + `"`)}, ErrTooLarge, "at most 16384 allowed"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := ValidateState(tc.state)
			if !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
				t.Fatalf("err %v, want %v", err, tc.want)
			}
			if err != nil && !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("message %q, want %q", err, tc.msg)
			}
		})
	}
}

func TestMetaValidate(t *testing.T) {
	owners := func(n int) []string {
		o := make([]string, n)
		for i := range o {
			o[i] = "o" + strings.Repeat("x", i%50)
		}
		return o
	}
	tags := func(n int) Tags {
		m := Tags{}
		for i := range n {
			m["k"+strings.Repeat("x", i)] = "v"
		}
		return m
	}
	tests := []struct {
		name string
		m    Meta
		msg  string
	}{
		{"ok", Meta{Owners: owners(MaxOwners), Region: "north", Tags: tags(MaxTags)}, ""},
		{"too many owners", Meta{Owners: owners(MaxOwners + 1)}, "owners: at most 256"},
		{"bad owner", Meta{Owners: []string{"a/b"}}, "not a valid openid"},
		{"bad region", Meta{Region: "no/where"}, "region must match"},
		{"too many tags", Meta{Tags: tags(MaxTags + 1)}, "tags: at most 64"},
		{"bad tag key", Meta{Tags: Tags{"bad key": "v"}}, "tags: key"},
		{"long tag value", Meta{Tags: Tags{"k": strings.Repeat("v", MaxTagValue+1)}}, "tags: key"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.m.Validate()
			if tc.msg == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.msg) {
				t.Fatalf("err %v, want ErrInvalid with %q", err, tc.msg)
			}
		})
	}
}

func TestParseLocationRefusesNonFinite(t *testing.T) {
	for _, q := range [][2]string{{"NaN", "0"}, {"0", "NaN"}, {"nan", "nan"}, {"Inf", "0"}, {"0", "-Inf"}, {"1e400", "0"}, {"91", "0"}, {"0", "181"}, {"", "1"}} {
		if _, err := ParseLocation(q[0], q[1]); !errors.Is(err, ErrBadParam) {
			t.Errorf("ParseLocation(%q, %q) = %v, want ErrBadParam", q[0], q[1], err)
		}
	}
	if l, err := ParseLocation("-90", "180"); err != nil || l != (Location{Lat: -90, Lng: 180}) {
		t.Fatalf("edge of range: %v %v", l, err)
	}
}

func TestNearest(t *testing.T) {
	loc := func(lat, lng float64) *Location { return &Location{Lat: lat, Lng: lng} }
	dir := []Edge{
		{ID: "far", Location: loc(40, 116), Healthy: true, Advertise: "https://far"},
		{ID: "near", Location: loc(31.2, 121.5), Healthy: true, LagMs: 7, Backlog: 3},
		{ID: "down", Location: loc(31.2, 121.4)},
		{ID: "self", Location: loc(30, 120)}, // unhealthy in the directory, but it is answering
		{ID: "nowhere", Healthy: true},
	}
	got := Nearest(dir, Location{Lat: 31.23, Lng: 121.47}, "self", 10)
	var ids []string
	for _, e := range got {
		ids = append(ids, e.ID)
		if !e.Healthy {
			t.Errorf("%s listed unhealthy", e.ID)
		}
	}
	if strings.Join(ids, ",") != "near,self,far,nowhere" {
		t.Fatalf("order %v", ids)
	}
	if got[0].LagMs != 7 || got[0].Backlog != 3 || got[2].URL != "https://far" || got[3].DistanceKm != nil || got[0].DistanceKm == nil {
		t.Fatalf("items %+v", got)
	}
	if n := Nearest(dir, Location{}, "", 1); len(n) != 1 {
		t.Fatalf("limit: %d items", len(n))
	}
	b, _ := json.Marshal(got[3])
	if string(b) != `{"id":"nowhere","url":"","region":"","location":null,"distance_km":null,"healthy":true,"lag_ms":0,"backlog":0}` {
		t.Fatalf("item shape %s", b)
	}
}
