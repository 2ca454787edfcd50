package fsm

import (
	"fmt"
	"testing"

	"github.com/hashicorp/raft"

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

// BenchmarkApplySinglePushes applies entries of 64 one-reading pushes from
// 64 edges, the shape group commit makes of many small concurrent pushes.
func BenchmarkApplySinglePushes(b *testing.B) {
	f := open(&testing.T{})
	defer f.Close()
	seqs := make([]uint64, 64)
	index := uint64(1)
	b.ReportAllocs()
	for b.Loop() {
		cmds := make([]*Command, 0, len(seqs))
		for e := range seqs {
			seqs[e]++
			edge := fmt.Sprintf("e%d", e)
			p := &wire.PushBatch{Edge: edge, FirstSeq: seqs[e], Changes: []wire.Change{{
				Kind: wire.KindReadings, Device: fmt.Sprintf("%s-dev", edge),
				Readings: []wire.Reading{{TS: int64(1000 + seqs[e]), ID: fmt.Sprintf("m%d", seqs[e]), Metrics: map[string]float64{"temp": 21.5}}},
			}}}
			// With the change digests, as the service proposes every push.
			cmds = append(cmds, &Command{Type: CmdPush, AtMs: 1, Push: p, Digests: []wire.Digest{p.Changes[0].Digest()}})
		}
		res := apply(&testing.T{}, f, index, cmds...)
		if len(res) != len(seqs) || res[0].Err != nil {
			b.Fatalf("apply: %+v", res[0])
		}
		index++
	}
	b.ReportMetric(float64(b.N*len(seqs))/b.Elapsed().Seconds(), "pushes/s")
}

// BenchmarkReadingsPageWithFullStage reads a 100-reading page of one device
// while the stage holds almost a flush's worth of other devices' readings:
// the worst case of the staged-readings scan that Readings adds.
func BenchmarkReadingsPageWithFullStage(b *testing.B) {
	f := open(&testing.T{})
	defer f.Close()
	seqs := make([]uint64, 64)
	index := uint64(1)
	for f.stage.n < f.stage.flushAt-64 {
		cmds := make([]*Command, 0, 64)
		for e := range seqs {
			seqs[e]++
			edge := fmt.Sprintf("e%d", e)
			cmds = append(cmds, &Command{Type: CmdPush, AtMs: 1, Push: &wire.PushBatch{Edge: edge, FirstSeq: seqs[e],
				Changes: []wire.Change{{Kind: wire.KindReadings, Device: edge + "-dev",
					Readings: []wire.Reading{{TS: int64(seqs[e]), Metrics: map[string]float64{"temp": 21.5}}}}}}})
		}
		apply(&testing.T{}, f, index, cmds...)
		index++
	}
	b.ReportMetric(float64(f.stage.n), "staged")
	for b.Loop() {
		items, _, err := f.Readings(ReadingsQuery{Device: "e7-dev", Limit: 100})
		if err != nil || len(items) != 63 {
			b.Fatalf("page: %d readings, %v", len(items), err)
		}
	}
}

// BenchmarkApplyPushDrain applies a drained backlog as syncbench's edge
// builds it: eight devices publish at a time, each 4000 readings in
// 500-reading changes, so a 40-change push holds five consecutive changes
// of each of eight devices, and raft hands the state machine two pushes
// per transaction (two in flight).
func BenchmarkApplyPushDrain(b *testing.B) {
	f := open(&testing.T{})
	defer f.Close()
	const perDev, perChange, group = 4000, 500, 8
	seq, index := uint64(1), uint64(1)
	change := 0 // the next change of the backlog
	next := func() wire.Change {
		// Within a group of eight devices, changes go round-robin.
		perGroup := group * perDev / perChange
		g, k := change/perGroup, change%perGroup
		d, part := g*group+k%group, k/group
		change++
		dev := fmt.Sprintf("dev-%03d", d)
		ch := wire.Change{Kind: wire.KindReadings, Device: dev}
		for j := part * perChange; j < (part+1)*perChange; j++ {
			ch.Readings = append(ch.Readings, wire.Reading{TS: int64(1000 + j), ID: fmt.Sprintf("%s-%d", dev, j),
				Metrics: map[string]float64{"temp": float64(j), "hum": 1}})
		}
		return ch
	}
	b.ReportAllocs()
	for b.Loop() {
		var logs []*raft.Log
		for range 2 {
			p := &wire.PushBatch{Edge: "e", FirstSeq: seq}
			for range 40 {
				p.Changes = append(p.Changes, next())
			}
			seq += 40
			enc, err := EncodeCommand(&Command{Type: CmdPush, AtMs: 1, Push: p})
			if err != nil {
				b.Fatal(err)
			}
			logs = append(logs, &raft.Log{Index: index, Type: raft.LogCommand, Data: EncodeEntry([][]byte{enc})})
			index++
		}
		for _, out := range f.ApplyBatch(logs) {
			if res, _ := out.([]Result); len(res) != 1 || res[0].Err != nil {
				b.Fatalf("apply: %+v", out)
			}
		}
	}
	b.ReportMetric(float64(b.N*80*perChange)/b.Elapsed().Seconds(), "readings/s")
}

// BenchmarkApplyPush100 applies a drained backlog as 20,000-reading pushes
// of 100 devices' 200-reading changes, each reading with a device ts and an
// id, one push per entry: the push syncbench's edge sends, as every replica
// applies it (decode included, encode not). It reports the apply cost per
// reading.
func BenchmarkApplyPush100(b *testing.B) {
	f := open(&testing.T{})
	defer f.Close()
	const devices, perChange = 100, 200
	seq, index := uint64(1), uint64(1)
	round := 0
	entry := func() []byte {
		p := &wire.PushBatch{Edge: "bench-edge", FirstSeq: seq}
		for d := range devices {
			dev := fmt.Sprintf("dev-%03d", d)
			ch := wire.Change{Kind: wire.KindReadings, Device: dev}
			for j := round * perChange; j < (round+1)*perChange; j++ {
				ch.Readings = append(ch.Readings, wire.Reading{TS: 1_700_000_000_000 + int64(j)*1000,
					ID: fmt.Sprintf("%s-%d", dev, j), Metrics: map[string]float64{"temp": float64(j), "hum": 1}})
			}
			p.Changes = append(p.Changes, ch)
		}
		seq += devices
		round++
		enc, err := EncodeCommand(&Command{Type: CmdPush, AtMs: 1, Push: p})
		if err != nil {
			b.Fatal(err)
		}
		return EncodeEntry([][]byte{enc})
	}
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		data := entry()
		b.StartTimer()
		out := f.ApplyBatch([]*raft.Log{{Index: index, Type: raft.LogCommand, Data: data}})
		if res, _ := out[0].([]Result); len(res) != 1 || res[0].Err != nil || res[0].Duplicates != 0 {
			b.Fatalf("apply: %+v", out)
		}
		index++
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*devices*perChange), "ns/reading")
	b.ReportMetric(0, "ns/op")
}
