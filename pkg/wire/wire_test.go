package wire

import (
	"encoding/json"
	"errors"
	"math"
	"reflect"
	"testing"

	"github.com/outpost-edge/outpost/pkg/shadow"
)

func TestValidate(t *testing.T) {
	ok := Change{Kind: KindReadings, Device: "d1", Readings: []Reading{{TS: 1, Metrics: map[string]float64{"t": 1}}}}
	tests := []struct {
		name string
		b    PushBatch
		bad  bool
	}{
		{"valid", PushBatch{Edge: "e1", FirstSeq: 1, Changes: []Change{ok}}, false},
		{"bad edge", PushBatch{Edge: "e 1", FirstSeq: 1, Changes: []Change{ok}}, true},
		{"zero seq", PushBatch{Edge: "e1", Changes: []Change{ok}}, true},
		{"empty", PushBatch{Edge: "e1", FirstSeq: 1}, true},
		{"unknown kind", PushBatch{Edge: "e1", FirstSeq: 1, Changes: []Change{{Kind: "x", Device: "d"}}}, true},
		{"NaN metric", PushBatch{Edge: "e1", FirstSeq: 1, Changes: []Change{{Kind: KindReadings, Device: "d",
			Readings: []Reading{{TS: 1, Metrics: map[string]float64{"t": math.NaN()}}}}}}, true},
		{"unstamped field", PushBatch{Edge: "e1", FirstSeq: 1, Changes: []Change{{Kind: KindReported, Device: "d",
			Doc: shadow.Doc{"f": {Value: []byte("1")}}}}}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.b.Validate()
			if tc.bad != (err != nil) || (err != nil && !errors.Is(err, ErrInvalid)) {
				t.Fatalf("Validate() = %v, want bad=%v", err, tc.bad)
			}
		})
	}
}

func TestDistanceKm(t *testing.T) {
	// Shanghai to Beijing is about 1070 km.
	d := DistanceKm(Location{Lat: 31.23, Lng: 121.47}, Location{Lat: 39.90, Lng: 116.40})
	if d < 1040 || d > 1100 {
		t.Fatalf("distance %f km", d)
	}
}

func TestTagsDecodeEitherForm(t *testing.T) {
	tests := []struct {
		in   string
		want map[string]string
	}{
		{`{"tags":{"a":"z","b":""}}`, map[string]string{"a": "z", "b": ""}},
		{`{"tags":["a=z","b"]}`, map[string]string{"a": "z", "b": ""}}, // the list older edges send
		{`{}`, nil},
	}
	for _, tc := range tests {
		var m Meta
		if err := json.Unmarshal([]byte(tc.in), &m); err != nil {
			t.Fatalf("%s: %v", tc.in, err)
		}
		if !reflect.DeepEqual(map[string]string(m.Tags), tc.want) {
			t.Fatalf("%s: tags %v, want %v", tc.in, m.Tags, tc.want)
		}
	}
	var m Meta
	if err := json.Unmarshal([]byte(`{"tags":7}`), &m); err == nil {
		t.Fatal("a number decoded as tags")
	}
	out, _ := json.Marshal(Meta{Tags: Tags{"a": "z"}})
	if string(out) != `{"tags":{"a":"z"}}` {
		t.Fatalf("encoded %s, want the object form", out)
	}
}
