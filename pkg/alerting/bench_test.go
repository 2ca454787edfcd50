package alerting

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/store"
)

// discardSaver takes saves without storing them.
type discardSaver struct{}

func (discardSaver) SaveRuleEvents(context.Context, uint64, []rules.Event) error { return nil }

// BenchmarkRunnerPass is the runner's own cost per committed reading with
// edgebench's rule load: 100 rules, one per device, over 100 devices, each
// raising and clearing an alert about every 70 readings. An op is what
// the runner does after a commit of one reading per device: a pass over
// those 100 outbox entries, then a tick. Saves are discarded (at the edge
// they ride the ingest commit), and the entries are read from the outbox
// tail, as at the edge when the runner keeps up.
func BenchmarkRunnerPass(b *testing.B) {
	const devices, rounds = 100, 100
	st, err := store.Open(filepath.Join(b.TempDir(), "edge.db"), store.Options{HoldOutboxForRules: true, NoSync: true})
	if err != nil {
		b.Fatal(err)
	}
	defer st.Close()
	ts := time.Now().UnixMilli()
	for i := range rounds {
		items := make([]store.Item, devices)
		for d := range items {
			ts++
			items[d] = store.Item{Device: fmt.Sprintf("dev-%d", d), ReceivedAt: ts, Readings: []store.Reading{{TS: ts,
				Metrics: []store.Metric{{Name: "temp", Value: float64(20 + (i+d)%10)}, {Name: "hum", Value: float64(40 + (i+d)%7)}}}}}
		}
		if _, err := st.Ingest(items, nil); err != nil {
			b.Fatal(err)
		}
	}
	clk := hlc.NewClock(nil, 0)
	r := New(Config{Store: st, Saver: discardSaver{}, Now: time.Now, Stamp: clk.Now, Batch: devices})
	e := rules.NewEngine(nil, clk.Now)
	var local []rules.Rule
	for i := range devices {
		local = append(local, rules.Rule{Name: fmt.Sprintf("bench-%d", i), When: "temp > 29 && hum > 45", Clear: "temp < 21",
			Devices: rules.Selector{IDs: []string{fmt.Sprintf("dev-%d", i)}}})
	}
	if err := r.install(e, sources{local: local}); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		r.seq = uint64(i%rounds) * devices
		if _, err := r.pass(e); err != nil {
			b.Fatal(err)
		}
		r.tick(e)
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*devices)/1000, "µs/reading")
}
