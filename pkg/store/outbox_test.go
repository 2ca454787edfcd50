package store

import (
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/outpost-edge/outpost/pkg/shadow"
)

func raw(kv ...string) map[string]json.RawMessage {
	out := map[string]json.RawMessage{}
	for i := 0; i < len(kv); i += 2 {
		out[kv[i]] = json.RawMessage(kv[i+1])
	}
	return out
}

func TestOutboxSequenceAndChanges(t *testing.T) {
	s := openTestStore(t, "", Options{NoSync: true, EdgeID: "e1", Region: "r1"})
	// 1: readings of a, 2: reported of a, 3: readings of b (same batch)
	mustIngest(t, s,
		item("a", reading(t0, "1", "t", 1.0), reading(t0+1, "2", "t", 2.0)),
		Item{Device: "a", ReceivedAt: t0, State: raw("fw", `"1.0"`, "mode", `"eco"`)},
		item("b", reading(t0, "1", "t", 3.0)),
	)
	// A batch of nothing but duplicates adds no entry.
	mustIngest(t, s, item("a", reading(t0, "1", "t", 1.0)))
	// 4: desired of a, 5: meta of c (pre-provisioned), 6: user
	if _, err := s.SetDesired("a", raw("mode", `"boost"`, "gone", `null`)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.SetMeta("c", DeviceMeta{Owners: []string{"u1"}, Region: "r9", Tags: map[string]string{"k": "v"}}); err != nil {
		t.Fatal(err)
	}
	if err := s.PutUser(User{OpenID: "u1", Roles: []string{"viewer"}, Regions: []string{"r9"}}); err != nil {
		t.Fatal(err)
	}

	ch, err := s.Outbox(0, 100, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		kind ChangeKind
		dev  string
	}{{ChangeReadings, "a"}, {ChangeReported, "a"}, {ChangeReadings, "b"}, {ChangeDesired, "a"}, {ChangeMeta, "c"}, {ChangeUser, "u1"}}
	if len(ch) != len(want) {
		t.Fatalf("%d outbox entries, want %d: %+v", len(ch), len(want), ch)
	}
	var last uint64
	for i, c := range ch {
		if c.Seq != uint64(i+1) || c.Kind != want[i].kind || c.Device != want[i].dev {
			t.Fatalf("entry %d = seq %d %v %s, want seq %d %v %s", i, c.Seq, c.Kind, c.Device, i+1, want[i].kind, want[i].dev)
		}
		if uint64(c.Stamp) <= last {
			t.Fatalf("entry %d stamp %d not after %d", i, c.Stamp, last)
		}
		last = uint64(c.Stamp)
	}
	if fmt.Sprint(ch[0].Readings) != fmt.Sprint([]Reading{reading(t0, "1", "t", 1.0), reading(t0+1, "2", "t", 2.0)}) {
		t.Fatalf("readings entry = %v", ch[0].Readings)
	}
	if st := ch[1].Doc.State(); string(st["fw"]) != `"1.0"` || string(st["mode"]) != `"eco"` {
		t.Fatalf("reported entry = %+v", ch[1].Doc)
	}
	if f := ch[3].Doc["gone"]; !f.Deleted || string(ch[3].Doc["mode"].Value) != `"boost"` {
		t.Fatalf("desired entry = %+v", ch[3].Doc)
	}
	if ch[4].Meta == nil || ch[4].Meta.Region != "r9" || ch[4].Meta.Owners[0] != "u1" || ch[4].Meta.Tags["k"] != "v" {
		t.Fatalf("meta entry = %+v", ch[4].Meta)
	}
	if ch[5].User == nil || ch[5].User.Roles[0] != "viewer" || ch[5].User.Stamp == 0 {
		t.Fatalf("user entry = %+v", ch[5].User)
	}

	// The registry reflects the same writes.
	a, err := s.Device("a")
	if err != nil {
		t.Fatal(err)
	}
	if string(a.Reported["fw"].Value) != `"1.0"` || string(a.Desired["mode"].Value) != `"boost"` || !a.Desired["gone"].Deleted {
		t.Fatalf("device a = %+v", a)
	}
	c, err := s.Device("c")
	if err != nil || c.Meta.Region != "r9" || c.LastSeen != 0 || c.EdgeID != "e1" {
		t.Fatalf("pre-provisioned device c = %+v, %v", c, err)
	}
	u, err := s.User("u1")
	if err != nil || u.Regions[0] != "r9" {
		t.Fatalf("User = %+v, %v", u, err)
	}
	if _, err := s.User("nobody"); err != ErrNotFound {
		t.Fatalf("unknown user: %v", err)
	}
	if got := s.Counts(); got.Devices != 3 || got.OutboxHead != 6 || got.OutboxBacklog != 6 || got.Readings != 3 {
		t.Fatalf("counts %+v", got)
	}

	t.Run("paging", func(t *testing.T) {
		for _, tt := range []struct {
			after     uint64
			max, size int
			want      []uint64
		}{
			{0, 2, 1 << 20, []uint64{1, 2}},
			{2, 2, 1 << 20, []uint64{3, 4}},
			{5, 10, 1 << 20, []uint64{6}},
			{6, 10, 1 << 20, nil},
			{0, 10, 1, []uint64{1}}, // at least one, however large
			{3, 10, 0, []uint64{4}},
			{0, 0, 1 << 20, nil},
		} {
			ch, err := s.Outbox(tt.after, tt.max, tt.size)
			if err != nil {
				t.Fatal(err)
			}
			var seqs []uint64
			for _, c := range ch {
				seqs = append(seqs, c.Seq)
			}
			if fmt.Sprint(seqs) != fmt.Sprint(tt.want) {
				t.Errorf("Outbox(%d, %d, %d) = %v, want %v", tt.after, tt.max, tt.size, seqs, tt.want)
			}
		}
		// A byte budget that fits exactly the first two entries.
		all, _ := s.Outbox(0, 100, 1<<20)
		b1, _ := encodeChange(&all[0])
		b2, _ := encodeChange(&all[1])
		ch, _ := s.Outbox(0, 100, len(b1)+len(b2))
		if len(ch) != 2 {
			t.Fatalf("byte-limited page has %d entries, want 2", len(ch))
		}
	})

	t.Run("ack", func(t *testing.T) {
		first, _ := s.OldestUnsynced()
		if first != ch[0].Stamp {
			t.Fatalf("OldestUnsynced = %d, want %d", first, ch[0].Stamp)
		}
		if err := s.AckOutbox(7); err == nil || !strings.Contains(err.Error(), "beyond head") {
			t.Fatalf("ack beyond head: %v", err)
		}
		for _, seq := range []uint64{2, 2, 1, 0} { // idempotent, never backwards
			if err := s.AckOutbox(seq); err != nil {
				t.Fatal(err)
			}
			if got := s.Counts(); got.OutboxAcked != 2 || got.OutboxBacklog != 4 {
				t.Fatalf("after ack %d: %+v", seq, got)
			}
		}
		rest, _ := s.Outbox(0, 100, 1<<20)
		if len(rest) != 4 || rest[0].Seq != 3 {
			t.Fatalf("outbox after ack = %+v", rest)
		}
		if oldest, _ := s.OldestUnsynced(); oldest != ch[2].Stamp {
			t.Fatalf("OldestUnsynced after ack = %d, want %d", oldest, ch[2].Stamp)
		}
	})

	t.Run("counters survive reopen", func(t *testing.T) {
		before := s.Counts()
		clockBefore := s.clock.Last()
		s := reopen(t, s)
		if got := s.Counts(); got != before {
			t.Fatalf("counts after reopen %+v, want %+v", got, before)
		}
		// Numbering and the clock continue where they were.
		if _, err := s.SetDesired("a", raw("x", "1")); err != nil {
			t.Fatal(err)
		}
		ch, _ := s.Outbox(6, 10, 1<<20)
		if len(ch) != 1 || ch[0].Seq != 7 || ch[0].Stamp <= clockBefore {
			t.Fatalf("entry after reopen = %+v (clock before %d)", ch, clockBefore)
		}
		if err := s.AckOutbox(7); err != nil {
			t.Fatal(err)
		}
		if got := s.Counts(); got.OutboxBacklog != 0 {
			t.Fatalf("backlog after acking all: %+v", got)
		}
		if oldest, _ := s.OldestUnsynced(); oldest != 0 {
			t.Fatalf("OldestUnsynced of an empty outbox = %d", oldest)
		}
	})
}

func TestAckOutboxLarge(t *testing.T) {
	s := openTestStore(t, "", Options{NoSync: true})
	const n = 10000 + 2345 // more than one ack chunk
	// A batch writes one readings entry per device: batches of seven
	// devices make seven entries each.
	var items []Item
	for i := 0; i < n; i++ {
		items = append(items, item(fmt.Sprintf("d%d", i%7), reading(t0+int64(i), "", "t", float64(i))))
		if len(items) == 7 || i == n-1 {
			mustIngest(t, s, items...)
			items = items[:0]
		}
	}
	if err := s.AckOutbox(n - 1); err != nil {
		t.Fatal(err)
	}
	ch, err := s.Outbox(0, 10, 1<<20)
	if err != nil || len(ch) != 1 || ch[0].Seq != n {
		t.Fatalf("outbox after acking %d of %d: %d entries, %v", n-1, n, len(ch), err)
	}
	s = reopen(t, s)
	if c := s.Counts(); c.OutboxAcked != n-1 || c.OutboxHead != n {
		t.Fatalf("counts after reopen %+v", c)
	}
}

func TestReportedStateMerge(t *testing.T) {
	s := openTestStore(t, "", Options{NoSync: true})
	res := mustIngest(t, s, Item{Device: "d", ReceivedAt: t0, State: raw("fw", `"1.0"`, "mode", `"eco"`)})
	if !res[0].StateChanged || res[0].Stored != 0 {
		t.Fatalf("result %+v", res[0])
	}
	// A later message updates one field and deletes another; the rest stays.
	mustIngest(t, s, Item{Device: "d", ReceivedAt: t0 + 1, State: raw("fw", `"1.1"`, "mode", `null`, "temp", `{"unit":"C"}`)})
	d, err := s.Device("d")
	if err != nil {
		t.Fatal(err)
	}
	st := d.Reported.State()
	if len(st) != 2 || string(st["fw"]) != `"1.1"` || string(st["temp"]) != `{"unit":"C"}` || !d.Reported["mode"].Deleted {
		t.Fatalf("reported = %+v", d.Reported)
	}
	// Telemetry and state for one device in one batch.
	res = mustIngest(t, s,
		Item{Device: "d", ReceivedAt: t0 + 2, Readings: []Reading{reading(t0, "", "t", 1.0)}},
		Item{Device: "d", ReceivedAt: t0 + 3, State: raw("fw", `"2.0"`)})
	if res[0].Stored != 1 || !res[1].StateChanged {
		t.Fatalf("results %+v", res)
	}
	s = reopen(t, s)
	d, _ = s.Device("d")
	if string(d.Reported["fw"].Value) != `"2.0"` || d.LastSeen != t0+3 || d.FirstSeen != t0 {
		t.Fatalf("device after reopen = %+v", d)
	}
	ch, _ := s.Outbox(0, 100, 1<<20)
	kinds := ""
	for _, c := range ch {
		kinds += c.Kind.String() + " "
	}
	if kinds != "reported reported readings reported " {
		t.Fatalf("outbox kinds = %q", kinds)
	}
	var merged = shadow.Doc{}
	for _, c := range ch {
		if c.Kind == ChangeReported {
			merged.Merge(c.Doc)
		}
	}
	if fmt.Sprint(merged.State()) != fmt.Sprint(d.Reported.State()) {
		t.Fatalf("outbox deltas merge to %v, device has %v", merged.State(), d.Reported.State())
	}
}

func TestDeadLettersBounded(t *testing.T) {
	s := openTestStore(t, "", Options{NoSync: true, MaxDeadLetters: 5})
	big := []byte(strings.Repeat("x", 10000))
	for i := 0; i < 8; i++ {
		dl := DeadLetter{At: t0 + int64(i), Topic: "sensors/d/telemetry", Reason: fmt.Sprintf("reason %d", i), Payload: []byte(fmt.Sprint(i))}
		if i == 7 {
			dl.Payload = big
		}
		// Dead letters commit with the batch they arrived in.
		if _, err := s.Ingest([]Item{item("d", reading(t0+int64(i), "", "t", 1.0))}, []DeadLetter{dl}); err != nil {
			t.Fatal(err)
		}
	}
	check := func(t *testing.T, s *Store) {
		t.Helper()
		dls, err := s.DeadLetters(0, 100)
		if err != nil {
			t.Fatal(err)
		}
		if len(dls) != 5 || s.Counts().DeadLetters != 5 {
			t.Fatalf("%d dead letters kept (count %d), want 5", len(dls), s.Counts().DeadLetters)
		}
		for i, d := range dls {
			if d.Seq != uint64(i+4) || d.Reason != fmt.Sprintf("reason %d", i+3) || d.At != t0+int64(i+3) {
				t.Fatalf("dead letter %d = %+v; the oldest must go first", i, d)
			}
		}
		if len(dls[4].Payload) != maxDeadPayload {
			t.Fatalf("payload of %d bytes kept, want truncation to %d", len(dls[4].Payload), maxDeadPayload)
		}
		page, _ := s.DeadLetters(5, 2)
		if len(page) != 2 || page[0].Seq != 6 {
			t.Fatalf("DeadLetters(5, 2) = %+v", page)
		}
	}
	check(t, s)
	s = reopen(t, s)
	check(t, s)
	// Many in one batch: still bounded.
	var many []DeadLetter
	for i := 0; i < 20; i++ {
		many = append(many, DeadLetter{Reason: fmt.Sprintf("batch %d", i)})
	}
	if _, err := s.Ingest(nil, many); err != nil {
		t.Fatal(err)
	}
	dls, _ := s.DeadLetters(0, 100)
	if len(dls) != 5 || dls[0].Reason != "batch 15" || s.Counts().DeadLetters != 5 {
		t.Fatalf("after a batch of 20: %d kept, first %+v", len(dls), dls[0])
	}
}

func TestUsageGrows(t *testing.T) {
	s := openTestStore(t, "", Options{NoSync: true})
	u0, err := s.Usage()
	if err != nil {
		t.Fatal(err)
	}
	if u0 > 1<<20 {
		t.Fatalf("an empty store uses %d bytes", u0)
	}
	var items []Item
	for i := 0; i < 20000; i++ {
		items = append(items, item(fmt.Sprintf("d%d", i%10), reading(t0+int64(i)*1000, fmt.Sprintf("id-%d", i), "temp", float64(i), "hum", 40.0)))
	}
	if _, err := s.Ingest(items, nil); err != nil {
		t.Fatal(err)
	}
	u1, err := s.Usage()
	if err != nil {
		t.Fatal(err)
	}
	if u1 <= u0 || u1 < 20000*16 {
		t.Fatalf("usage %d -> %d after 20000 readings", u0, u1)
	}
	if u1 > s.FileSize() {
		t.Fatalf("usage %d exceeds the file size %d", u1, s.FileSize())
	}
}

// TestCountersUnderConcurrentWrites runs ingest, API writes and retention
// at once; the persisted counters must match the data after a reopen.
func TestCountersUnderConcurrentWrites(t *testing.T) {
	s := openTestStore(t, "", Options{NoSync: true})
	const rounds = 150
	var wg sync.WaitGroup
	wg.Add(3)
	go func() {
		defer wg.Done()
		for i := 0; i < rounds; i++ {
			if _, err := s.Ingest([]Item{item(fmt.Sprintf("ing-%d", i), reading(t0+int64(i), "", "t", 1.0), reading(t0+int64(i)+1, "", "t", 1.0))}, nil); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	go func() {
		defer wg.Done()
		for i := 0; i < rounds; i++ {
			if _, err := s.SetDesired(fmt.Sprintf("api-%d", i), raw("m", "1")); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	go func() {
		defer wg.Done()
		for i := 0; i < rounds; i++ {
			if err := s.AckOutbox(s.Counts().OutboxHead); err != nil {
				t.Error(err)
				return
			}
			if _, err := s.Prune(t.Context(), t0+int64(i)/2); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	wg.Wait()
	devices, readings := 0, 0
	s.Devices("", func(d *Device) bool {
		devices++
		if strings.HasPrefix(d.ID, "ing-") {
			p, err := s.Readings(d.ID, ReadingsQuery{})
			if err != nil {
				t.Fatal(err)
			}
			readings += len(p.Items)
		}
		return true
	})
	for _, s := range []*Store{s, reopen(t, s)} {
		c := s.Counts()
		if c.Devices != uint64(devices) || c.Readings != uint64(readings) {
			t.Fatalf("counts %+v, but %d devices and %d readings exist", c, devices, readings)
		}
		if c.OutboxAcked > c.OutboxHead {
			t.Fatalf("acked beyond head: %+v", c)
		}
	}
}
