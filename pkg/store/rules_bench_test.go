package store

import (
	"strconv"
	"testing"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/rules"
)

// BenchmarkIngestRuleSaves is a group commit of edgebench's rules side: 100
// devices with one reading each, carrying the rule runner's save of 10
// alert transitions (fired and cleared in turn, over the devices round
// robin in a spread order, one rule per device), the outbox held for rules and never acked
// (no cloud). pages/commit is what the rules add to the commit's writes
// next to BenchmarkIngestCPU's devices=100/messages=1.
func BenchmarkIngestRuleSaves(b *testing.B) {
	const devices, transitions = 100, 10
	st, names := benchStore(b, devices, Options{NoSync: true, HoldOutboxForRules: true})
	open := make([]*rules.Alert, devices)
	ts := int64(1732170000000)
	next := 0
	b.ReportAllocs()
	b.ResetTimer()
	writes0 := txWrites(st)
	for i := 0; i < b.N; i++ {
		items := make([]Item, devices)
		for d := range names {
			items[d] = Item{Device: names[d], ReceivedAt: ts, Readings: []Reading{{
				TS: ts, ID: "m" + strconv.Itoa(i), Metrics: []Metric{{"temp", 20.5}, {"hum", 40}}}}}
		}
		evs := make([]rules.Event, 0, transitions)
		for range transitions {
			d := next * 37 % devices // spread over the devices, as alerts are
			next++
			rule := "bench-" + strconv.Itoa(d)
			k := rules.Key{Rule: rule, Device: names[d]}
			if a := open[d]; a != nil {
				c := *a
				c.Merge(rules.Alert{ClearedAt: ts, ClearStamp: hlc.New(ts, 1)})
				open[d] = nil
				evs = append(evs, rules.Event{Kind: rules.Cleared, State: rules.State{Key: k, Version: "v"}, Alert: &c})
				continue
			}
			a := &rules.Alert{ID: rules.AlertID(rule, names[d], ts), Rule: rule, Device: names[d], Severity: "warning",
				State: rules.StateActive, Value: 30, StartedAt: ts, Stamp: hlc.New(ts, 0)}
			open[d] = a
			c := *a
			evs = append(evs, rules.Event{Kind: rules.Fired, State: rules.State{Key: k, Version: "v", Alert: a}, Alert: &c})
		}
		ts++
		if _, err := st.Ingest(items, nil, RuleSave{Seq: st.Counts().OutboxHead, Events: evs}); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(txWrites(st)-writes0)/float64(b.N), "pages/commit")
}
