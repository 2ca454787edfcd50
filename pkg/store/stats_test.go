package store

import (
	"context"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// bruteStats computes what Stats must return from the raw readings.
func bruteStats(rs []Reading, metric string, from, to, step int64) []StatsBucket {
	cells := map[int64]*agg{}
	for _, r := range rs {
		if r.TS < from || r.TS > to {
			continue
		}
		for _, m := range r.Metrics {
			if m.Name != metric {
				continue
			}
			p := r.TS - mod(r.TS, step)
			if cells[p] == nil {
				cells[p] = new(agg)
			}
			cells[p].add(m.Value)
		}
	}
	var ps []int64
	for p := range cells {
		ps = append(ps, p)
	}
	slices.Sort(ps)
	out := []StatsBucket{}
	for _, p := range ps {
		c := cells[p]
		out = append(out, StatsBucket{TS: p, Count: c.Count, Min: c.Min, Max: c.Max, Avg: c.Sum / float64(c.Count)})
	}
	return out
}

func checkStats(t *testing.T, s *Store, dev string, rs []Reading, metric string, from, to, step int64) {
	t.Helper()
	got, err := s.Stats(dev, metric, from, to, step)
	if err != nil {
		t.Fatalf("Stats(%s, %d, %d, %d): %v", metric, from, to, step, err)
	}
	want := bruteStats(rs, metric, from, to, step)
	if len(got) != len(want) {
		t.Fatalf("Stats(%s, from %d, to %d, step %d): %d buckets, want %d\ngot  %v\nwant %v", metric, from, to, step, len(got), len(want), got, want)
	}
	for i := range got {
		g, w := got[i], want[i]
		if g.TS != w.TS || g.Count != w.Count || g.Min != w.Min || g.Max != w.Max || math.Abs(g.Avg-w.Avg) > 1e-9*math.Max(1, math.Abs(w.Avg)) {
			t.Fatalf("Stats(%s, from %d, to %d, step %d) bucket %d = %+v, want %+v", metric, from, to, step, i, g, w)
		}
	}
}

func statsSteps() []int64 {
	return []int64{1, 7000, 45000, 60000, 5 * 60000, 7 * 60000, 3600000, 2 * 3600000, 24 * 3600000}
}

func TestStatsMatchesBruteForce(t *testing.T) {
	s := openTestStore(t, "", Options{NoSync: true})
	rng := rand.New(rand.NewPCG(3, 4))
	span := int64(5 * 3600 * 1000)
	rs := randomReadings(rng, 1500, t0, span)
	for i := 0; i < len(rs); i += 200 {
		mustIngest(t, s, item("dev", rs[i:min(i+200, len(rs))]...))
	}
	// Redelivered duplicates must not count twice in the rollups.
	mustIngest(t, s, item("dev", rs[:300]...))
	// Another device's data must not leak in.
	mustIngest(t, s, item("other", randomReadings(rng, 100, t0, span)...))

	for _, step := range statsSteps() {
		for i := 0; i < 6; i++ {
			from := t0 - 1000 + rng.Int64N(span/2)
			to := from + rng.Int64N(span)
			if i == 0 {
				from, to = 0, t0+2*span // whole range, aligned from
			}
			if step == 1 && to-from > 120000 {
				to = from + 120000 // keep the raw-millisecond case small
			}
			for _, metric := range []string{"a", "b"} {
				checkStats(t, s, "dev", rs, metric, from, to, step)
			}
		}
	}
	checkStats(t, s, "dev", rs, "zzz", 0, t0+span, 60000)

	t.Run("after reopen", func(t *testing.T) {
		s := reopen(t, s)
		checkStats(t, s, "dev", rs, "a", t0+12345, t0+span-6789, 3600000)
	})
}

func TestStatsEdgeCases(t *testing.T) {
	s := openTestStore(t, "", Options{NoSync: true})
	mustIngest(t, s, item("dev", reading(t0, "", "a", 1.0), reading(t0+3600000, "", "a", 3.0)))
	for _, tt := range []struct {
		name         string
		from, to     int64
		step         int64
		wantErr      bool
		wantBuckets  int
		wantCountAll uint64
	}{
		{"bad step", 0, t0, 0, true, 0, 0},
		{"negative step", 0, t0, -5, true, 0, 0},
		{"from after to", t0, t0 - 1, 1000, true, 0, 0},
		{"negative from", -10 * 3600000, t0 + 2*3600000, 3600000, false, 2, 2},
		{"no upper bound", 0, math.MaxInt64, 3600000, false, 2, 2},
		{"single ms", t0, t0, 1, false, 1, 1},
		// A tiny step over the whole epoch must answer promptly.
		{"tiny step over decades", 0, t0 + 10*3600000, 1, false, 2, 2},
		{"empty range", t0 + 1, t0 + 1000, 60000, false, 0, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := s.Stats("dev", "a", tt.from, tt.to, tt.step)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v", err, tt.wantErr)
			}
			var n uint64
			for _, b := range got {
				n += b.Count
			}
			if len(got) != tt.wantBuckets || n != tt.wantCountAll {
				t.Fatalf("Stats = %+v", got)
			}
		})
	}
}

func TestPrune(t *testing.T) {
	s := openTestStore(t, "", Options{NoSync: true})
	rng := rand.New(rand.NewPCG(5, 6))
	span := int64(4 * 3600 * 1000)
	rs := randomReadings(rng, 1200, t0, span)
	for i := range rs {
		rs[i].ReceiveTS = i%3 == 0 // these are in the id index
	}
	// Ingest in batches; ack the outbox up to the middle batch so that
	// the readings of later batches are unsynced whatever their age.
	var ackTo uint64
	for i := 0; i < len(rs); i += 100 {
		mustIngest(t, s, item("dev", rs[i:min(i+100, len(rs))]...))
		if i == 500 {
			ackTo = s.Counts().OutboxHead
		}
	}
	if err := s.AckOutbox(ackTo); err != nil {
		t.Fatal(err)
	}
	if ackTo != 6 {
		t.Fatalf("outbox head after 6 batches = %d", ackTo)
	}
	acked := map[string]bool{} // readings of the first 6 batches
	for _, r := range rs[:600] {
		acked[r.ID] = true
	}
	cutoff := t0 + span/2 + 12345 // not aligned to minutes or hours
	var keep []Reading
	wantDeleted, wantUnsynced := 0, 0
	for _, r := range rs {
		switch {
		case r.TS >= cutoff:
			keep = append(keep, r)
		case !acked[r.ID]:
			keep = append(keep, r)
			wantUnsynced++
		default:
			wantDeleted++
		}
	}
	if wantDeleted == 0 || wantUnsynced == 0 {
		t.Fatalf("bad test data: %d to delete, %d unsynced", wantDeleted, wantUnsynced)
	}
	res, err := s.Prune(context.Background(), cutoff)
	if err != nil {
		t.Fatal(err)
	}
	if res.Deleted != wantDeleted || res.Unsynced != wantUnsynced {
		t.Fatalf("Prune = %+v, want deleted %d unsynced %d", res, wantDeleted, wantUnsynced)
	}
	check := func(t *testing.T, s *Store) {
		t.Helper()
		got := allReadings(t, s, "dev", ReadingsQuery{Limit: 500})
		var gotIDs, wantIDs []string
		for _, r := range got {
			gotIDs = append(gotIDs, r.ID)
		}
		for _, r := range keep {
			wantIDs = append(wantIDs, r.ID)
		}
		if !sameSet(gotIDs, wantIDs) {
			t.Fatalf("%d readings left, want %d", len(gotIDs), len(wantIDs))
		}
		if c := s.Counts(); c.Readings != uint64(len(keep)) {
			t.Fatalf("Counts().Readings = %d, want %d", c.Readings, len(keep))
		}
		for _, step := range []int64{7000, 60000, 5 * 60000, 3600000, 2 * 3600000} {
			checkStats(t, s, "dev", keep, "a", t0-5000, t0+span+5000, step)
			checkStats(t, s, "dev", keep, "b", t0+333, cutoff+999, step)
		}
	}
	check(t, s)
	// A second pass finds nothing more; after acking everything, the
	// rest goes.
	if res, err := s.Prune(context.Background(), cutoff); err != nil || res.Deleted != 0 || res.Unsynced != wantUnsynced {
		t.Fatalf("second Prune = %+v, %v", res, err)
	}
	s = reopen(t, s)
	check(t, s)

	if err := s.AckOutbox(s.Counts().OutboxHead); err != nil {
		t.Fatal(err)
	}
	if res, err := s.Prune(context.Background(), cutoff); err != nil || res.Deleted != wantUnsynced || res.Unsynced != 0 {
		t.Fatalf("Prune after full ack = %+v, %v", res, err)
	}
	keep = slices.DeleteFunc(keep, func(r Reading) bool { return r.TS < cutoff })
	check(t, s)

	// A pruned id is forgotten with its reading; the index does not grow
	// without bound.
	indexed := 0
	for _, r := range keep {
		if r.ReceiveTS {
			indexed++
		}
	}
	if err := s.db.View(func(tx *bolt.Tx) error {
		n := 0
		c := newSpan(tx.Bucket(bucketIDs), "dev").Cursor()
		for k, _ := c.First(); k != nil; k, _ = c.Next() {
			n++
		}
		if n != indexed {
			return fmt.Errorf("%d ids indexed, want %d", n, indexed)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// TestPruneLongUnsyncedRun has more old unsynced readings than one prune
// chunk ahead of synced ones: the synced ones must still go, and the kept
// ones' rollups must stay.
func TestPruneLongUnsyncedRun(t *testing.T) {
	s := openTestStore(t, "", Options{NoSync: true})
	n := pruneChunk + 700
	var synced, unsynced []Reading
	for i := 0; i < 300; i++ {
		synced = append(synced, reading(t0+int64(n+i)*1000, fmt.Sprintf("s%d", i), "a", float64(i)))
	}
	mustIngest(t, s, item("dev", synced...))
	if err := s.AckOutbox(s.Counts().OutboxHead); err != nil {
		t.Fatal(err)
	}
	// Late-arriving backlog with older stamps, not yet synced.
	for i := 0; i < n; i++ {
		unsynced = append(unsynced, reading(t0+int64(i)*1000, fmt.Sprintf("u%d", i), "a", float64(-i)))
	}
	for i := 0; i < n; i += 1000 {
		mustIngest(t, s, item("dev", unsynced[i:min(i+1000, n)]...))
	}
	cutoff := t0 + int64(n+300)*1000
	res, err := s.Prune(context.Background(), cutoff)
	if err != nil {
		t.Fatal(err)
	}
	if res.Deleted != len(synced) || res.Unsynced != n {
		t.Fatalf("Prune = %+v, want %d deleted and %d unsynced kept", res, len(synced), n)
	}
	if c := s.Counts(); c.Readings != uint64(n) {
		t.Fatalf("Counts().Readings = %d, want %d", c.Readings, n)
	}
	for _, step := range []int64{60000, 3600000} {
		checkStats(t, s, "dev", unsynced, "a", 0, cutoff+1e6, step)
	}
}
