package store

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
)

func TestReadingsRangeAndPagination(t *testing.T) {
	s := openTestStore(t, "", Options{NoSync: true})
	rng := rand.New(rand.NewPCG(1, 2))
	span := int64(3 * 3600 * 1000)
	all := randomReadings(rng, 600, t0, span)
	// Same-millisecond readings must page correctly too.
	for i := 0; i < 20; i++ {
		all = append(all, reading(t0+span/2, fmt.Sprintf("same-%d", i), "a", float64(i)))
	}
	for i := 0; i < len(all); i += 100 {
		mustIngest(t, s, item("dev", all[i:min(i+100, len(all))]...))
	}
	from, to := t0+span/4+17, t0+3*span/4-3
	var want []string
	for _, r := range all {
		if r.TS >= from && r.TS <= to {
			want = append(want, r.ID)
		}
	}

	for _, limit := range []int{1, 7, 50, 1000} {
		t.Run(fmt.Sprintf("limit=%d", limit), func(t *testing.T) {
			q := ReadingsQuery{From: from, To: to, Limit: limit}
			var got []Reading
			pages := 0
			for {
				p, err := s.Readings("dev", q)
				if err != nil {
					t.Fatal(err)
				}
				pages++
				if len(p.Items) > limit {
					t.Fatalf("page of %d items, limit %d", len(p.Items), limit)
				}
				if p.Next != "" && len(p.Items) != limit {
					t.Fatalf("short page of %d with a next cursor", len(p.Items))
				}
				got = append(got, p.Items...)
				if p.Next == "" {
					break
				}
				q.Cursor = p.Next
			}
			checkOrdered(t, got, from, to)
			var ids []string
			for _, r := range got {
				ids = append(ids, r.ID)
			}
			if !sameSet(ids, want) {
				t.Fatalf("pages hold %d readings, want the %d in range (limit %d, %d pages)", len(ids), len(want), limit, pages)
			}
		})
	}

	t.Run("inserts between pages", func(t *testing.T) {
		q := ReadingsQuery{From: from, To: to, Limit: 25}
		var got []Reading
		n := 0
		for {
			p, err := s.Readings("dev", q)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, p.Items...)
			if p.Next == "" {
				break
			}
			q.Cursor = p.Next
			// New readings before, inside and after the remaining range.
			n++
			mustIngest(t, s, item("dev",
				reading(from+int64(n), fmt.Sprintf("new-early-%d", n), "a", 1.0),
				reading(to-int64(n), fmt.Sprintf("new-late-%d", n), "a", 1.0),
				reading(to+int64(n), fmt.Sprintf("new-out-%d", n), "a", 1.0)))
		}
		checkOrdered(t, got, from, to)
		var old []string
		late := 0
		for _, r := range got {
			switch {
			case len(r.ID) > 8 && r.ID[:8] == "new-late":
				late++
			case len(r.ID) > 4 && r.ID[:4] == "new-":
				// early ones may or may not be seen depending on the cursor
			default:
				old = append(old, r.ID)
			}
		}
		if !sameSet(old, want) {
			t.Fatalf("with concurrent inserts the pages hold %d original readings, want %d", len(old), len(want))
		}
		if late != n {
			t.Fatalf("saw %d of %d readings inserted ahead of the cursor", late, n)
		}
	})
}

func checkOrdered(t *testing.T, rs []Reading, from, to int64) {
	t.Helper()
	seen := map[string]bool{}
	for i, r := range rs {
		if r.TS < from || r.TS > to {
			t.Fatalf("reading %d at %d outside [%d, %d]", i, r.TS, from, to)
		}
		if i > 0 && r.TS < rs[i-1].TS {
			t.Fatalf("reading %d at %d before its predecessor at %d", i, r.TS, rs[i-1].TS)
		}
		if seen[key(r)] {
			t.Fatalf("reading %s returned twice", key(r))
		}
		seen[key(r)] = true
	}
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

func TestReadingsMetricFilterLatestAndErrors(t *testing.T) {
	s := openTestStore(t, "", Options{NoSync: true})
	mustIngest(t, s, item("dev",
		reading(t0, "1", "a", 1.0),
		reading(t0+1, "2", "a", 2.0, "b", 20.0),
		reading(t0+2, "3", "b", 30.0),
		reading(t0+3, "4", "a", 4.0),
		reading(t0+4, "5", "c", 5.0, "b", 50.0),
	))
	got := allReadings(t, s, "dev", ReadingsQuery{Metric: "b", Limit: 2})
	want := []Reading{reading(t0+1, "2", "b", 20.0), reading(t0+2, "3", "b", 30.0), reading(t0+4, "5", "b", 50.0)}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("metric b = %v\nwant %v", got, want)
	}
	if got := allReadings(t, s, "dev", ReadingsQuery{Metric: "zzz"}); len(got) != 0 {
		t.Fatalf("unknown metric returned %v", got)
	}
	// Every metric of a reading, in the order received.
	got = allReadings(t, s, "dev", ReadingsQuery{From: t0 + 4, To: t0 + 4})
	if fmt.Sprint(got) != fmt.Sprint([]Reading{reading(t0+4, "5", "c", 5.0, "b", 50.0)}) {
		t.Fatalf("single reading = %v", got)
	}

	latest, err := s.Latest("dev")
	if err != nil || fmt.Sprint(latest) != fmt.Sprint(reading(t0+4, "5", "c", 5.0, "b", 50.0)) {
		t.Fatalf("Latest = %v, %v", latest, err)
	}
	// Latest is by reading time, not arrival.
	mustIngest(t, s, item("dev", reading(t0-1000, "old", "a", 0.0)))
	if latest, _ := s.Latest("dev"); latest.ID != "5" {
		t.Fatalf("Latest after an older reading arrived = %v", latest)
	}

	if _, err := s.Latest("nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Latest of unknown device: %v", err)
	}
	if _, err := s.Readings("nope", ReadingsQuery{}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Readings of unknown device: %v", err)
	}
	if _, err := s.Stats("nope", "a", 0, t0, 60000); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Stats of unknown device: %v", err)
	}
	for _, c := range []string{"!!", "AAAA", encodeCursor([]byte("short"))} {
		if _, err := s.Readings("dev", ReadingsQuery{Cursor: c}); !errors.Is(err, ErrBadCursor) {
			t.Fatalf("cursor %q: %v", c, err)
		}
	}
	// A device known only from its desired state has no readings.
	if _, err := s.SetDesired("pre", nil); err != nil {
		t.Fatal(err)
	}
	if p, err := s.Readings("pre", ReadingsQuery{}); err != nil || len(p.Items) != 0 {
		t.Fatalf("Readings of a device without readings = %v, %v", p, err)
	}
	if _, err := s.Latest("pre"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Latest of a device without readings: %v", err)
	}
}

func TestDedupe(t *testing.T) {
	tests := []struct {
		name    string
		batches [][]Reading // each batch is one Ingest call
		reopen  bool        // close and reopen between batches
		stored  int
	}{
		{"same id within one batch", [][]Reading{{reading(t0, "x", "a", 1.0), reading(t0, "x", "a", 1.0)}}, false, 1},
		// Without a device ts, a redelivery is stamped with a new receive
		// time: the id alone identifies it.
		{"receive-time id within one batch", [][]Reading{{recv(t0, "x", "a", 1.0), recv(t0+5, "x", "a", 1.0)}}, false, 1},
		{"receive-time id across batches", [][]Reading{{recv(t0, "x", "a", 1.0)}, {recv(t0+5, "x", "a", 1.0)}}, false, 1},
		{"receive-time id across reopen", [][]Reading{{recv(t0, "x", "a", 1.0)}, {recv(t0+60000, "x", "a", 1.0)}}, true, 1},
		{"same id across batches", [][]Reading{{reading(t0, "x", "a", 1.0)}, {reading(t0, "x", "a", 1.0)}}, false, 1},
		{"same id across reopen", [][]Reading{{reading(t0, "x", "a", 1.0)}, {reading(t0, "x", "a", 1.0)}}, true, 1},
		{"no id, same ts and metrics, one batch", [][]Reading{{reading(t0, "", "a", 1.0, "b", 2.0), reading(t0, "", "a", 1.0, "b", 2.0)}}, false, 1},
		{"no id, same ts and metrics, across batches", [][]Reading{{reading(t0, "", "a", 1.0)}, {reading(t0, "", "a", 1.0)}}, false, 1},
		{"no id, same ts and metrics, across reopen", [][]Reading{{reading(t0, "", "a", 1.0)}, {reading(t0, "", "a", 1.0)}}, true, 1},
		{"no id, same ts, other values", [][]Reading{{reading(t0, "", "a", 1.0), reading(t0, "", "a", 1.5)}}, false, 2},
		{"no id, same values, other ts", [][]Reading{{reading(t0, "", "a", 1.0), reading(t0+1, "", "a", 1.0)}}, false, 2},
		{"different ids same body", [][]Reading{{reading(t0, "x", "a", 1.0), reading(t0, "y", "a", 1.0)}}, false, 2},
		{"id and no id same body", [][]Reading{{reading(t0, "x", "a", 1.0)}, {reading(t0, "", "a", 1.0)}}, false, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := openTestStore(t, "", Options{NoSync: true})
			stored, dups, total := 0, 0, 0
			for i, b := range tt.batches {
				if i > 0 && tt.reopen {
					s = reopen(t, s)
				}
				res := mustIngest(t, s, item("dev", b...))
				stored += res[0].Stored
				dups += res[0].Duplicates
				total += len(b)
			}
			if stored != tt.stored || dups != total-tt.stored {
				t.Fatalf("stored %d, duplicates %d; want %d, %d", stored, dups, tt.stored, total-tt.stored)
			}
			if got := allReadings(t, s, "dev", ReadingsQuery{}); len(got) != tt.stored {
				t.Fatalf("%d readings stored, want %d: %v", len(got), tt.stored, got)
			}
			if c := s.Counts(); c.Readings != uint64(tt.stored) {
				t.Fatalf("Counts().Readings = %d, want %d", c.Readings, tt.stored)
			}
			// Duplicates travel to the cloud once too.
			n := 0
			ch, err := s.Outbox(0, 1000, 1<<20)
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range ch {
				n += len(c.Readings)
			}
			if n != tt.stored {
				t.Fatalf("outbox carries %d readings, want %d", n, tt.stored)
			}
		})
	}
	t.Run("ids are per device", func(t *testing.T) {
		s := openTestStore(t, "", Options{NoSync: true})
		res := mustIngest(t, s, item("a", reading(t0, "x", "m", 1.0)), item("b", reading(t0, "x", "m", 1.0)))
		if res[0].Stored != 1 || res[1].Stored != 1 {
			t.Fatalf("results %+v", res)
		}
	})
}

func TestDevicesRegistry(t *testing.T) {
	s := openTestStore(t, "", Options{NoSync: true, EdgeID: "edge-1", Region: "north"})
	mustIngest(t, s,
		Item{Device: "b", ReceivedAt: t0, Readings: []Reading{reading(t0, "", "a", 1.0)}},
		Item{Device: "a", ReceivedAt: t0 + 10, Readings: []Reading{reading(t0, "", "a", 1.0)}},
		Item{Device: "a", ReceivedAt: t0 + 20, Readings: []Reading{reading(t0, "", "a", 2.0)}},
	)
	mustIngest(t, s, Item{Device: "a", ReceivedAt: t0 + 5, Readings: []Reading{reading(t0, "", "a", 3.0)}})
	d, err := s.Device("a")
	if err != nil {
		t.Fatal(err)
	}
	if d.EdgeID != "edge-1" || d.Meta.Region != "north" || d.FirstSeen != t0+10 || d.LastSeen != t0+20 {
		t.Fatalf("device = %+v", d)
	}
	if c := s.Counts(); c.Devices != 2 {
		t.Fatalf("Counts().Devices = %d", c.Devices)
	}
	var ids []string
	if err := s.Devices("", func(d *Device) bool { ids = append(ids, d.ID); return true }); err != nil {
		t.Fatal(err)
	}
	ids2 := []string{}
	s.Devices("a", func(d *Device) bool { ids2 = append(ids2, d.ID); return true })
	if fmt.Sprint(ids, ids2) != "[a b] [b]" {
		t.Fatalf("Devices = %v, after a = %v", ids, ids2)
	}
	if _, err := s.Device("zz"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown device: %v", err)
	}
}

// recv is a reading stamped with the edge's receive time (no device ts).
func recv(ts int64, id string, kv ...any) Reading {
	r := reading(ts, id, kv...)
	r.ReceiveTS = true
	return r
}
