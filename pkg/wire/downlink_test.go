package wire

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"testing"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/shadow"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// The desired-state downlink is a contract with device firmware: its bytes
// are pinned by golden files, so a change to the encoding shows up as a diff
// in testdata/ rather than as devices that stop applying their state.
func TestDesiredPayloadGolden(t *testing.T) {
	raw := func(s string) json.RawMessage { return json.RawMessage(s) }
	tests := []struct {
		name string
		doc  shadow.Doc
	}{
		{"empty", shadow.Doc{}},
		{"fields", shadow.Doc{
			"mode":  {Value: raw(`"eco"`), Stamp: hlc.New(1700000000000, 0)},
			"temp":  {Value: raw(` 21.5 `), Stamp: hlc.New(1700000000100, 2)},
			"sched": {Value: raw(`{"on": [7, 19], "note": "<b>&"}`), Stamp: hlc.New(1700000000050, 0)},
		}},
		// A tombstone is left out of state but still counts for the version:
		// the deletion is the newest change the device must apply.
		{"tombstone_newest", shadow.Doc{
			"mode": {Value: raw(`"eco"`), Stamp: hlc.New(1700000000000, 0)},
			"fan":  {Stamp: hlc.New(1700000000999, 7), Deleted: true},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := DesiredPayload(tt.doc)
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join("testdata", "downlink", tt.name+".json")
			if *update {
				if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(path, append(got, '\n'), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("golden file (run with -update to create it): %v", err)
			}
			if !bytes.Equal(got, bytes.TrimSuffix(want, []byte("\n"))) {
				t.Fatalf("payload\n got %s\nwant %s", got, want)
			}
			// And it decodes as the documented shape.
			var d Desired
			if err := json.Unmarshal(got, &d); err != nil {
				t.Fatal(err)
			}
			if d.Version != tt.doc.Version().String() || len(d.State) != len(tt.doc.State()) {
				t.Fatalf("decoded %+v from %s", d, got)
			}
		})
	}
}

func TestDesiredTopic(t *testing.T) {
	if got, want := DesiredTopic("pump-7"), "devices/pump-7/desired"; got != want {
		t.Fatalf("DesiredTopic = %q, want %q", got, want)
	}
}
