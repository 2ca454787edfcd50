package syncer

import (
	"encoding/json"
	"testing"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/shadow"
	"github.com/outpost-edge/outpost/pkg/store"
)

// A state value stored before the JSON rules existed (1e400, invalid
// UTF-8) travels as null: the cloud refuses a batch holding it, which would
// stall the sequenced stream for good. The outbox entry itself is left as
// it is.
func TestToWireScrubsValuesBreakingTheJSONRules(t *testing.T) {
	stamp := hlc.New(1700000000000, 1)
	c := store.Change{Kind: store.ChangeReported, Device: "d1", Doc: shadow.Doc{
		"ok":  {Value: json.RawMessage(`"eco"`), Stamp: stamp},
		"big": {Value: json.RawMessage(`1e400`), Stamp: stamp},
		"bad": {Value: json.RawMessage("\"\xff\""), Stamp: stamp},
	}}
	w := toWire(&c)
	if err := w.Validate(); err != nil {
		t.Fatalf("the cloud would refuse the change: %v", err)
	}
	if string(w.Doc["big"].Value) != "null" || string(w.Doc["bad"].Value) != "null" || string(w.Doc["ok"].Value) != `"eco"` {
		t.Fatalf("wire doc %v", w.Doc)
	}
	if string(c.Doc["big"].Value) != "1e400" {
		t.Fatal("toWire modified the outbox entry")
	}
}
