package fsm

import (
	"fmt"
	"testing"

	"github.com/outpost-edge/outpost/pkg/wire"
)

// BenchmarkApplyPush applies an edge's backlog as 20000-reading pushes of
// 40 devices' 500-reading changes with string ids, as syncbench sends them.
func BenchmarkApplyPush(b *testing.B) {
	f := open(&testing.T{})
	defer f.Close()
	seq, index := uint64(1), uint64(1)
	round := 0
	b.ReportAllocs()
	for b.Loop() {
		p := &wire.PushBatch{Edge: "e", FirstSeq: seq}
		for d := 0; d < 40; d++ {
			dev := fmt.Sprintf("dev-%03d", (round*40+d)%100)
			base := ((round*40 + d) / 100) * 500
			ch := wire.Change{Kind: wire.KindReadings, Device: dev}
			for j := base; j < base+500; j++ {
				ch.Readings = append(ch.Readings, wire.Reading{TS: int64(1000 + j), ID: fmt.Sprintf("%s-%d", dev, j),
					Metrics: map[string]float64{"temp": float64(j), "hum": 1}})
			}
			p.Changes = append(p.Changes, ch)
		}
		res := apply(&testing.T{}, f, index, &Command{Type: CmdPush, AtMs: 1, Push: p})
		if len(res) != 1 || res[0].Err != nil {
			b.Fatalf("apply: %+v", res)
		}
		seq += 40
		index++
		round++
	}
}
