package rules

import (
	"fmt"
	"testing"
	"time"
)

// BenchmarkEvaluate100Rules: one reading against 100 rules that each
// select one of 100 devices (the bench-ingest "with rules" shape): the
// rule CPU per reading.
func BenchmarkEvaluate100Rules(b *testing.B) {
	var rs []Rule
	for i := range 100 {
		rs = append(rs, Rule{Name: fmt.Sprintf("r%d", i), When: "temp > 30 && humidity < 80", Clear: "temp < 28",
			Devices: Selector{IDs: []string{fmt.Sprintf("dev-%d", i)}}})
	}
	set, err := CompileSet(rs)
	if err != nil {
		b.Fatal(err)
	}
	e := NewEngine(nil, (&clock{}).stamp)
	e.Swap(time.UnixMilli(0), set)
	devs := make([]Device, 100)
	for i := range devs {
		devs[i] = Device{ID: fmt.Sprintf("dev-%d", i), Tags: map[string]string{"site": "lab"}}.Prepared() // as the runner caches them
	}
	m := map[string]float64{"temp": 25, "humidity": 40}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		e.Evaluate(time.UnixMilli(int64(i)), devs[i%100], m)
		i++
	}
}
