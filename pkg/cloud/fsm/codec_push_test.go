package fsm

import (
	"bytes"
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/outpost-edge/outpost/pkg/wire"
)

// TestEncodeSortedMetrics: a push whose readings carry sorted metrics (the
// push decoder's form) encodes to the bytes the same push with maps does,
// which TestWriteFuzzSeeds pins to the layout already in raft logs.
func TestEncodeSortedMetrics(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	names := []string{"t", "hum", "a", "zz", "é", "x\x00y", ""}
	for range 200 {
		sorted := &wire.PushBatch{Edge: "e1", FirstSeq: 1 + rng.Uint64N(1000)}
		maps := &wire.PushBatch{Edge: sorted.Edge, FirstSeq: sorted.FirstSeq}
		for c := range 1 + rng.IntN(4) {
			sc := wire.Change{Kind: wire.KindReadings, Device: fmt.Sprint("d", c)}
			mc := sc
			for range 1 + rng.IntN(10) {
				m := map[string]float64{}
				for range rng.IntN(4) {
					m[names[rng.IntN(len(names))]] = rng.NormFloat64() * math.Pow(10, float64(rng.IntN(40)-20))
				}
				ms := make([]wire.Metric, 0, len(m))
				for k, v := range m {
					ms = append(ms, wire.Metric{Name: k, Value: v})
				}
				ms, _ = wire.SortMetrics(ms)
				r := wire.Reading{TS: rng.Int64N(1 << 44), ID: fmt.Sprint(rng.IntN(3))}
				sr, mr := r, r
				sr.Sorted, mr.Metrics = ms, m
				sc.Readings = append(sc.Readings, sr)
				mc.Readings = append(mc.Readings, mr)
			}
			sorted.Changes = append(sorted.Changes, sc)
			maps.Changes = append(maps.Changes, mc)
		}
		digests := make([]wire.Digest, len(maps.Changes))
		for i := range maps.Changes {
			digests[i] = maps.Changes[i].Digest()
			if d := sorted.Changes[i].Digest(); d != digests[i] {
				t.Fatalf("change %d: digest %x of sorted metrics, %x of the map", i, d, digests[i])
			}
		}
		got, err := EncodeCommand(&Command{Type: CmdPush, AtMs: 5, Push: sorted, Digests: digests})
		if err != nil {
			t.Fatal(err)
		}
		want, err := EncodeCommand(&Command{Type: CmdPush, AtMs: 5, Push: maps, Digests: digests})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("sorted metrics encode to\n%x\nmaps to\n%x", got, want)
		}
		if _, err := decodeCommand(got); err != nil {
			t.Fatal(err)
		}
	}
}
