package store

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"reflect"
	"sync/atomic"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/rules"
)

// tailPair is two stores fed the same writes: one reads its outbox tail
// from memory, the other (tail off) always from bbolt.
type tailPair struct {
	t         *testing.T
	tail, ref *Store
}

func newTailPair(t *testing.T, tailBytes int) *tailPair {
	// Clocks that tick the same in both stores, so the same writes get
	// the same stamps.
	clock := func() *hlc.Clock {
		var ms atomic.Int64
		ms.Store(t0)
		return hlc.NewClock(func() time.Time { return time.UnixMilli(ms.Add(1)) }, 0)
	}
	return &tailPair{t: t,
		tail: openTestStore(t, "", Options{HoldOutboxForRules: true, OutboxTailBytes: tailBytes, Clock: clock(), NoSync: true}),
		ref:  openTestStore(t, "", Options{HoldOutboxForRules: true, OutboxTailBytes: -1, Clock: clock(), NoSync: true}),
	}
}

// both runs op on each store and checks they agree on failing.
func (p *tailPair) both(what string, op func(s *Store) error) error {
	p.t.Helper()
	e1, e2 := op(p.tail), op(p.ref)
	if (e1 == nil) != (e2 == nil) {
		p.t.Fatalf("%s: with the tail %v, without %v", what, e1, e2)
	}
	return e1
}

func (p *tailPair) compare(after uint64, max, maxBytes int) []Change {
	p.t.Helper()
	got, err1 := p.tail.Outbox(after, max, maxBytes)
	want, err2 := p.ref.Outbox(after, max, maxBytes)
	if err1 != nil || err2 != nil {
		p.t.Fatalf("Outbox(%d, %d, %d): %v / %v", after, max, maxBytes, err1, err2)
	}
	if !reflect.DeepEqual(got, want) {
		p.t.Fatalf("Outbox(%d, %d, %d) with the tail:\n%+v\nfrom bbolt:\n%+v", after, max, maxBytes, got, want)
	}
	return got
}

// deepCopy copies changes down to their metrics.
func deepCopy(cs []Change) []Change {
	out := append([]Change(nil), cs...)
	for i := range out {
		rs := append([]Reading(nil), out[i].Readings...)
		for j := range rs {
			rs[j].Metrics = append([]Metric(nil), rs[j].Metrics...)
		}
		if out[i].Readings != nil {
			out[i].Readings = rs
		}
	}
	return out
}

// TestOutboxTailMatchesBbolt: over random interleavings of ingest (with
// and without rule saves), other outbox writes, acks, rule saves and
// failed transactions, a store reading its outbox tail from memory
// answers every Outbox call exactly as one reading bbolt does, including
// with a tail small enough to evict and a tail that a trim empties; and
// what it handed out (shared memory) never changes afterwards.
func TestOutboxTailMatchesBbolt(t *testing.T) {
	for _, tailBytes := range []int{2 << 10, 64 << 10, defaultOutboxTailBytes} {
		t.Run(fmt.Sprint(tailBytes), func(t *testing.T) {
			p := newTailPair(t, tailBytes)
			rng := rand.New(rand.NewPCG(uint64(tailBytes), 7))
			served := 0
			type handed struct{ got, copy []Change }
			var kept []handed
			for step := 0; step < 300; step++ {
				head := p.tail.Counts().OutboxHead
				switch op := rng.IntN(20); {
				case op < 9: // ingest, sometimes with a rule save riding it
					items := randomItems(rng, step)
					var saves []RuleSave
					if rng.IntN(3) == 0 {
						saves = []RuleSave{{Seq: rng.Uint64N(head + 1), Events: []rules.Event{
							alertEvent(rules.Fired, "r", items[0].Device, rules.StateActive, int64(step+1))}}}
					}
					p.both("Ingest", func(s *Store) error { _, err := s.Ingest(items, nil, saves...); return err })
				case op < 11: // a transaction that fails after appending
					items := append(randomItems(rng, step), Item{Device: "", ReceivedAt: t0, Readings: []Reading{reading(t0, "", "x", 1.0)}})
					if p.both("failing Ingest", func(s *Store) error { _, err := s.Ingest(items, nil); return err }) == nil {
						t.Fatal("an item without a device was stored")
					}
					if hi := p.tail.tail.hi(); hi > p.tail.Counts().OutboxHead {
						t.Fatalf("the tail holds seq %d past the committed head %d", hi, p.tail.Counts().OutboxHead)
					}
				case op < 13:
					dev := fmt.Sprintf("d%d", rng.IntN(4))
					p.both("SetDesired", func(s *Store) error {
						_, err := s.SetDesiredBy(dev, map[string]json.RawMessage{"fan": json.RawMessage(fmt.Sprint(step))}, Actor{OpenID: "u", Proof: "p"})
						return err
					})
				case op < 14:
					dev := fmt.Sprintf("d%d", rng.IntN(4))
					p.both("SetMeta", func(s *Store) error {
						_, err := s.SetMeta(dev, DeviceMeta{Region: "r", Owners: []string{"o"}, Tags: map[string]string{"k": "v"}})
						return err
					})
				case op < 15:
					p.both("PutUser", func(s *Store) error { return s.PutUser(User{OpenID: "u", Roles: []string{"admin"}}) })
				case op < 17:
					seq := rng.Uint64N(head + 1)
					p.both("AckOutbox", func(s *Store) error { return s.AckOutbox(seq) })
				default:
					seq := rng.Uint64N(head + 1)
					p.both("SaveRuleEvents", func(s *Store) error { return s.SaveRuleEvents(seq, nil) })
				}
				head = p.tail.Counts().OutboxHead
				for range 3 {
					after := rng.Uint64N(head + 2)
					if rng.IntN(2) == 0 && head > 0 {
						after = head - min(head, rng.Uint64N(8)) // near the head, where the tail serves
					}
					max, maxBytes := 1+rng.IntN(12), 1+rng.IntN(600)
					if _, ok, _ := p.tail.tail.read(after, max, maxBytes); ok {
						served++
					}
					if got := p.compare(after, max, maxBytes); step%10 == 0 {
						kept = append(kept, handed{got, deepCopy(got)})
					}
				}
			}
			for _, h := range kept {
				if !reflect.DeepEqual(h.got, h.copy) {
					t.Fatalf("a result handed out changed later:\n%+v\nwas\n%+v", h.got, h.copy)
				}
			}
			if served == 0 {
				t.Fatal("the tail served no read: the comparison proved nothing")
			}
		})
	}
}

func randomItems(rng *rand.Rand, step int) []Item {
	items := make([]Item, 1+rng.IntN(4))
	for i := range items {
		dev := fmt.Sprintf("d%d", rng.IntN(4))
		ts := t0 + int64(step*100+i)
		var rs []Reading
		for j := range 1 + rng.IntN(3) {
			r := reading(ts+int64(j), "", "temp", float64(rng.IntN(50)), "hum", rng.Float64())
			if rng.IntN(4) == 0 {
				r.ID, r.ReceiveTS = fmt.Sprintf("m%d-%d-%d", step, i, j), true
			}
			rs = append(rs, r)
		}
		items[i] = Item{Device: dev, ReceivedAt: ts, Readings: rs}
		if rng.IntN(4) == 0 {
			items[i].State = map[string]json.RawMessage{"fw": json.RawMessage(fmt.Sprint(step))}
		}
	}
	return items
}

// TestOutboxTailFailedTransaction: entries a failed transaction appended
// never reach the tail, and the sequences it used, reused by the next
// commit, read back as that commit wrote them.
func TestOutboxTailFailedTransaction(t *testing.T) {
	s := openTestStore(t, "", Options{})
	mustIngest(t, s, item("a", reading(t0, "", "t", 1.0)))
	_, err := s.Ingest([]Item{item("b", reading(t0, "", "t", 2.0)), item("", reading(t0, "", "t", 3.0))}, nil)
	if err == nil {
		t.Fatal("an item without a device was stored")
	}
	if hi := s.tail.hi(); hi != 1 {
		t.Fatalf("tail ends at %d after the failed commit, want 1", hi)
	}
	mustIngest(t, s, item("c", reading(t0, "", "t", 4.0)))
	got, err := s.Outbox(0, 10, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := s.tail.read(0, 10, 1<<20); !ok {
		t.Fatal("the tail did not serve the read")
	}
	if len(got) != 2 || got[0].Device != "a" || got[1].Device != "c" || got[1].Seq != 2 {
		t.Fatalf("outbox after a failed commit: %+v", got)
	}
}

// TestOutboxTailCopiesReadings: the tail keeps its own copy of the
// readings: a caller reusing its buffers after Ingest changes nothing.
func TestOutboxTailCopiesReadings(t *testing.T) {
	s := openTestStore(t, "", Options{})
	it := item("a", reading(t0, "", "t", 1.0))
	mustIngest(t, s, it)
	it.Readings[0].Metrics[0].Value = 99
	it.Readings[0].TS = 0
	got, err := s.Outbox(0, 10, 1<<20)
	if err != nil || len(got) != 1 {
		t.Fatalf("Outbox: %+v %v", got, err)
	}
	if r := got[0].Readings[0]; r.TS != t0 || r.Metrics[0].Value != 1 {
		t.Fatalf("the tail's reading changed with the caller's buffer: %+v", r)
	}
}

// TestOutboxTailHandlerOrder: bbolt runs commit handlers after releasing
// its writer lock, so two transactions' fills and trims may reach the tail
// in either order; whatever the order, it never holds a gap or an entry
// the bucket no longer has.
func TestOutboxTailHandlerOrder(t *testing.T) {
	es := func(lo, hi uint64) tailBatch {
		var out tailBatch
		for s := lo; s <= hi; s++ {
			out.append(Change{Seq: s, Kind: ChangeReadings}, tailInfo{size: 10})
		}
		return out
	}
	seqs := func(tl *outboxTail) []uint64 {
		var out []uint64
		for _, c := range tl.entries.cs {
			out = append(out, c.Seq)
		}
		return out
	}
	for _, tc := range []struct {
		name string
		ops  func(tl *outboxTail)
		want []uint64
	}{
		{"in order", func(tl *outboxTail) { tl.add(es(1, 2)); tl.add(es(3, 4)) }, []uint64{1, 2, 3, 4}},
		{"later fill first", func(tl *outboxTail) { tl.add(es(1, 2)); tl.add(es(5, 6)); tl.add(es(3, 4)) }, []uint64{5, 6}},
		{"trim before the fill it covers", func(tl *outboxTail) { tl.trim(4); tl.add(es(3, 6)) }, []uint64{5, 6}},
		{"trim all", func(tl *outboxTail) { tl.add(es(1, 4)); tl.trim(9); tl.add(es(5, 6)) }, nil},
		{"trim part", func(tl *outboxTail) { tl.add(es(1, 4)); tl.trim(2) }, []uint64{3, 4}},
		{"hole inside a fill", func(tl *outboxTail) {
			b := es(1, 2)
			b.append(Change{Seq: 4}, tailInfo{size: 10})
			tl.add(b)
		}, []uint64{4}},
		{"entry bound", func(tl *outboxTail) { tl.maxEntries = 3; tl.add(es(1, 5)) }, []uint64{3, 4, 5}},
		{"byte bound", func(tl *outboxTail) { tl.maxBytes = 2 * (10 + tailOverhead); tl.add(es(1, 5)) }, []uint64{4, 5}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tl := newOutboxTail(1 << 20)
			tc.ops(tl)
			if got := seqs(tl); !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("tail holds %v, want %v", got, tc.want)
			}
		})
	}
}

// TestOutboxTailSlabs: a commit of one entry pins only what that entry
// holds (a quiet edge commits every message alone, and the tail holds
// 65,536 entries).
func TestOutboxTailSlabs(t *testing.T) {
	s := openTestStore(t, "", Options{NoSync: true})
	mustIngest(t, s, item("a", reading(t0, "", "t", 1.0, "h", 2.0)))
	l := s.tail.log // the last transaction's
	if cap(l.readings) != 1 || cap(l.metrics) != 2 {
		t.Fatalf("one reading of two metrics kept in slabs of %d readings and %d metrics", cap(l.readings), cap(l.metrics))
	}
}

// TestOutboxTailOutOfOrderEntries: a batch writes a device's readings entry
// when it closes it, after entries with later sequences (a state change
// after the device's first reading); the tail still serves the batch, in
// sequence order, as bbolt holds it.
func TestOutboxTailOutOfOrderEntries(t *testing.T) {
	s := openTestStore(t, "", Options{})
	ref := openTestStore(t, "", Options{OutboxTailBytes: -1})
	batch := []Item{
		item("a", reading(t0, "", "t", 1.0)),
		{Device: "b", ReceivedAt: t0, State: map[string]json.RawMessage{"fw": json.RawMessage(`"2"`)}},
		item("a", reading(t0+1, "", "t", 2.0)),
	}
	for _, st := range []*Store{s, ref} {
		mustIngest(t, st, batch...)
	}
	got, ok, err := s.tail.read(0, 10, 1<<20)
	if err != nil || !ok {
		t.Fatalf("the tail did not serve the batch: ok=%v err=%v", ok, err)
	}
	want, err := ref.Outbox(0, 10, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || len(want) != 2 || got[0].Seq != 1 || got[0].Kind != ChangeReadings || len(got[0].Readings) != 2 ||
		got[1].Seq != 2 || got[1].Kind != want[1].Kind || got[1].Device != "b" {
		t.Fatalf("tail served %+v, bbolt holds %+v", got, want)
	}
}
