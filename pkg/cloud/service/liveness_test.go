package service

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/internal/daemontest"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Heartbeats are soft state: only the first and one that changes a durable
// fact reach raft; the directory still shows each one's backlog.
func TestHeartbeatsStayOffRaft(t *testing.T) {
	n := startService(t, Config{})
	ctx := context.Background()
	hb := func(h wire.Heartbeat) {
		t.Helper()
		if _, err := n.svc.Heartbeat(ctx, "e1", &h); err != nil {
			t.Fatal(err)
		}
	}
	loc := &wire.Location{Lat: 31.2, Lng: 121.5}
	hb(wire.Heartbeat{Region: "north", Location: loc, Advertise: "http://e1:8080"})
	before := n.fsm.AppliedIndex()
	for i := 0; i < 20; i++ {
		hb(wire.Heartbeat{Region: "north", Location: &wire.Location{Lat: 31.2, Lng: 121.5}, Advertise: "http://e1:8080", Backlog: uint64(i)})
	}
	if after := n.fsm.AppliedIndex(); after != before {
		t.Fatalf("20 heartbeats without a durable change moved the applied index from %d to %d", before, after)
	}
	edges, err := n.svc.Edges(ctx)
	if err != nil || len(edges) != 1 || edges[0].Backlog != 19 || !edges[0].Healthy || edges[0].Region != "north" {
		t.Fatalf("directory: %+v %v", edges, err)
	}
	// A durable change goes through raft, once.
	hb(wire.Heartbeat{Region: "south", Location: loc, Advertise: "http://e1:8080"})
	if n.fsm.AppliedIndex() == before {
		t.Fatal("a region change did not reach raft")
	}
	if rec, err := n.fsm.Edge("e1"); err != nil || rec.Region != "south" {
		t.Fatalf("durable record: %+v %v", rec, err)
	}
}

// The directory's version moves for a health flip and for a durable change,
// not for a heartbeat that changes neither; a delta carries only what moved,
// and a version of another epoch gets the whole directory.
func TestDirectoryDeltas(t *testing.T) {
	n := startService(t, Config{HeartbeatFresh: time.Minute})
	ctx := context.Background()
	for _, e := range []string{"e1", "e2", "e3"} {
		if _, err := n.svc.Heartbeat(ctx, e, &wire.Heartbeat{Region: "r", Backlog: 2}); err != nil {
			t.Fatal(err)
		}
	}
	pull := func(edge string, have wire.SetVersions) wire.PullPage {
		t.Helper()
		p, err := n.svc.Pull(ctx, edge, PullRequest{Limit: 100, Have: &have})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	first := pull("e1", wire.SetVersions{})
	if first.Directory == nil || !first.Directory.Full || len(first.Directory.Edges) != 3 || first.Versions == nil {
		t.Fatalf("first pull: %+v", first.Directory)
	}
	have := *first.Versions
	// Fresh heartbeats that change nothing material (a backlog within its
	// class): no delta.
	for _, e := range []string{"e1", "e2", "e3"} {
		if _, err := n.svc.Heartbeat(ctx, e, &wire.Heartbeat{Region: "r", Backlog: 5}); err != nil {
			t.Fatal(err)
		}
	}
	if p := pull("e1", have); p.Directory != nil || p.Keys != nil || p.Policies != nil || p.Versions.Directory != have.Directory {
		t.Fatalf("pull after fresh heartbeats carried sets: dir %+v keys %s policies %+v", p.Directory, p.Keys, p.Policies)
	}
	// e2 and e3 fall silent past HeartbeatFresh while e1 keeps beating:
	// a health flip each, which the liveness loop's sweep finds.
	n.offset.Store((2 * time.Minute).Milliseconds())
	if _, err := n.svc.Heartbeat(ctx, "e1", &wire.Heartbeat{Region: "r", Backlog: 2}); err != nil {
		t.Fatal(err)
	}
	n.svc.sweep()
	p := pull("e1", have)
	if p.Directory == nil || p.Directory.Full || len(p.Directory.Edges) != 2 {
		t.Fatalf("delta after two health flips: %+v", p.Directory)
	}
	for _, e := range p.Directory.Edges {
		if e.Healthy || e.ID == "e1" {
			t.Fatalf("delta entry %+v: want e2 and e3, unhealthy", e)
		}
	}
	// A durable change of one edge: a delta of one.
	have = *p.Versions
	if _, err := n.svc.Heartbeat(ctx, "e1", &wire.Heartbeat{Region: "moved", Backlog: 2}); err != nil {
		t.Fatal(err)
	}
	p = pull("e1", have)
	if p.Directory == nil || len(p.Directory.Edges) != 1 || p.Directory.Edges[0].Region != "moved" {
		t.Fatalf("delta after a region change: %+v", p.Directory)
	}
	got := p.Directory.Apply(first.Directory.Edges)
	if len(got) != 3 || got[0].Region != "moved" {
		t.Fatalf("applied delta: %+v", got)
	}
	// A location is a durable fact: a new one is a delta, the same one
	// again (heartbeats, sweeps) is not.
	for i, loc := range []wire.Location{{Lat: 31.2, Lng: 121.5}, {Lat: 31.2, Lng: 121.5}, {Lat: 31.2, Lng: 121.6}} {
		have = *p.Versions
		if _, err := n.svc.Heartbeat(ctx, "e1", &wire.Heartbeat{Region: "moved", Backlog: 2, Location: &loc}); err != nil {
			t.Fatal(err)
		}
		n.svc.sweep()
		p = pull("e1", have)
		if moved := i != 1; moved != (p.Directory != nil) {
			t.Fatalf("location %d %+v: delta %+v, want one: %v", i, loc, p.Directory, moved)
		}
		if p.Directory != nil && (len(p.Directory.Edges) != 1 || *p.Directory.Edges[0].Location != loc) {
			t.Fatalf("delta after location %+v: %+v", loc, p.Directory)
		}
	}
	// Another epoch's version: the whole directory.
	if p := pull("e1", wire.SetVersions{Directory: "other.5"}); p.Directory == nil || !p.Directory.Full || len(p.Directory.Edges) != 3 {
		t.Fatalf("pull with a foreign version: %+v", p.Directory)
	}
	// An edge that sends no versions gets every set whole.
	legacy, err := n.svc.Pull(ctx, "e1", PullRequest{Limit: 100})
	if err != nil || len(legacy.Edges) != 3 || legacy.Versions != nil || legacy.Directory != nil || len(legacy.Keys) == 0 {
		t.Fatalf("legacy pull: %+v %v", legacy, err)
	}
}

// A held pull returns as soon as a desired write for its edge commits, and
// empty at the end of its wait otherwise; a write for another edge does not
// end it.
func TestHeldPullReturnsOnWrite(t *testing.T) {
	n := startService(t, Config{PullHold: 400 * time.Millisecond})
	ctx := context.Background()
	if _, err := n.svc.Heartbeat(ctx, "e1", &wire.Heartbeat{}); err != nil {
		t.Fatal(err)
	}
	for _, e := range []string{"e1", "e2"} {
		if _, err := n.svc.Push(ctx, e, &wire.PushBatch{Edge: e, FirstSeq: 1, Changes: []wire.Change{{Kind: wire.KindReadings,
			Device: "dev-" + e, Readings: []wire.Reading{{TS: 1, Metrics: map[string]float64{"t": 1}}}}}}); err != nil {
			t.Fatal(err)
		}
	}
	p, err := n.svc.Pull(ctx, "e1", PullRequest{Limit: 100, Have: &wire.SetVersions{}})
	if err != nil {
		t.Fatal(err)
	}
	have, cursor := *p.Versions, p.NextCursor

	// Nothing for e1 (a write for e2 meanwhile): empty, after the hold.
	go func() {
		time.Sleep(50 * time.Millisecond)
		_, _ = n.svc.PutDesired(ctx, "dev-e2", map[string]json.RawMessage{"x": json.RawMessage(`1`)})
	}()
	start := time.Now()
	p, err = n.svc.Pull(ctx, "e1", PullRequest{Cursor: cursor, Limit: 100, Have: &have, Wait: time.Minute})
	if err != nil || len(p.Changes) != 0 || p.Directory != nil {
		t.Fatalf("idle held pull: %+v %v", p, err)
	}
	if d := time.Since(start); d < 350*time.Millisecond || d > 10*time.Second {
		t.Fatalf("idle held pull returned after %s, want the 400ms hold", d)
	}

	// A write for e1 while held: answered before the hold ends.
	n2 := startService(t, Config{PullHold: 20 * time.Second})
	if _, err := n2.svc.Heartbeat(ctx, "e1", &wire.Heartbeat{}); err != nil {
		t.Fatal(err)
	}
	if _, err := n2.svc.Push(ctx, "e1", &wire.PushBatch{Edge: "e1", FirstSeq: 1, Changes: []wire.Change{{Kind: wire.KindReadings,
		Device: "dev-e1", Readings: []wire.Reading{{TS: 1, Metrics: map[string]float64{"t": 1}}}}}}); err != nil {
		t.Fatal(err)
	}
	p, err = n2.svc.Pull(ctx, "e1", PullRequest{Limit: 100, Have: &wire.SetVersions{}})
	if err != nil {
		t.Fatal(err)
	}
	have, cursor = *p.Versions, p.NextCursor
	type result struct {
		p   wire.PullPage
		err error
		d   time.Duration
	}
	done := make(chan result, 1)
	go func() {
		start := time.Now()
		p, err := n2.svc.Pull(ctx, "e1", PullRequest{Cursor: cursor, Limit: 100, Have: &have, Wait: 20 * time.Second})
		done <- result{p, err, time.Since(start)}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for daemontest.Metric(t, n2.reg, "outpost_cloud_pulls_held") < 1 {
		if time.Now().After(deadline) {
			t.Fatal("the pull was not held")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if _, err := n2.svc.PutDesired(ctx, "dev-e1", map[string]json.RawMessage{"fan": json.RawMessage(`"on"`)}); err != nil {
		t.Fatal(err)
	}
	r := <-done
	if r.err != nil || len(r.p.Changes) != 1 || string(r.p.Changes[0].Doc["fan"].Value) != `"on"` {
		t.Fatalf("held pull after the write: %+v %v", r.p, r.err)
	}
	if r.d > 10*time.Second {
		t.Fatalf("held pull answered after %s, want at the write", r.d)
	}
}

// A held pull returns at once when its context ends (server shutdown).
func TestHeldPullEndsWithContext(t *testing.T) {
	n := startService(t, Config{PullHold: time.Minute})
	if _, err := n.svc.Heartbeat(context.Background(), "e1", &wire.Heartbeat{}); err != nil {
		t.Fatal(err)
	}
	p, err := n.svc.Pull(context.Background(), "e1", PullRequest{Limit: 100, Have: &wire.SetVersions{}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(100*time.Millisecond, cancel)
	start := time.Now()
	if _, err := n.svc.Pull(ctx, "e1", PullRequest{Cursor: p.NextCursor, Limit: 100, Have: p.Versions, Wait: time.Minute}); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("a held pull outlived its context by %s", d)
	}
}

// The leader records observed pull positions in one command, only when one
// moved, and that deletes the acknowledged entries.
func TestPullPositionsRecorded(t *testing.T) {
	n := startService(t, Config{})
	ctx := context.Background()
	if _, err := n.svc.Push(ctx, "e1", &wire.PushBatch{Edge: "e1", FirstSeq: 1, Changes: []wire.Change{{Kind: wire.KindReadings,
		Device: "dev-e1", Readings: []wire.Reading{{TS: 1, Metrics: map[string]float64{"t": 1}}}}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := n.svc.PutDesired(ctx, "dev-e1", map[string]json.RawMessage{"fan": json.RawMessage(`"on"`)}); err != nil {
		t.Fatal(err)
	}
	p, err := n.svc.Pull(ctx, "e1", PullRequest{Limit: 100})
	if err != nil || len(p.Changes) != 1 {
		t.Fatalf("pull: %+v %v", p, err)
	}
	before := n.fsm.AppliedIndex()
	n.svc.flushPullAcks(ctx)
	if n.fsm.AppliedIndex() != before {
		t.Fatal("a flush with no new position made a raft entry")
	}
	// The next pull, from the cursor, acknowledges the entry.
	if _, err := n.svc.Pull(ctx, "e1", PullRequest{Cursor: p.NextCursor, Limit: 100}); err != nil {
		t.Fatal(err)
	}
	n.svc.flushPullAcks(ctx)
	if n.fsm.PullPosition("e1") != p.NextCursor || n.fsm.DownlinkLen() != 0 {
		t.Fatalf("position %q, %d entries left", n.fsm.PullPosition("e1"), n.fsm.DownlinkLen())
	}
	idx := n.fsm.AppliedIndex()
	n.svc.flushPullAcks(ctx)
	if _, err := n.svc.Pull(ctx, "e1", PullRequest{Cursor: p.NextCursor, Limit: 100}); err != nil {
		t.Fatal(err)
	}
	n.svc.flushPullAcks(ctx)
	if n.fsm.AppliedIndex() != idx {
		t.Fatal("re-pulling from a recorded position made a raft entry")
	}
}

// A new leader has no soft state: it counts the edges it has not heard from
// as healthy for HeartbeatFresh (health unknown), then as what their
// heartbeats say.
func TestNewLeaderHealthUnknown(t *testing.T) {
	n := startService(t, Config{HeartbeatFresh: time.Minute})
	ctx := context.Background()
	for _, e := range []string{"e1", "e2"} {
		if _, err := n.svc.Heartbeat(ctx, e, &wire.Heartbeat{Region: "r", Backlog: 4}); err != nil {
			t.Fatal(err)
		}
	}
	// Another service over the same replica: what a node that just became
	// leader has (the replicated records, no soft state).
	now := func() time.Time { return time.Now().Add(time.Duration(n.offset.Load()) * time.Millisecond) }
	fresh := New(Config{HeartbeatFresh: time.Minute, Now: now}, n.raft, n.fsm, n.clock, discardLogger(), prometheus.NewRegistry())
	edges, err := fresh.Edges(ctx)
	if err != nil || len(edges) != 2 || !edges[0].Healthy || !edges[1].Healthy || edges[0].Backlog != 4 {
		t.Fatalf("new leader's directory: %+v %v", edges, err)
	}
	// e1 heartbeats to the new leader; e2 stays silent past the window.
	n.offset.Store((2 * time.Minute).Milliseconds())
	if _, err := fresh.Heartbeat(ctx, "e1", &wire.Heartbeat{Region: "r"}); err != nil {
		t.Fatal(err)
	}
	edges, _ = fresh.Edges(ctx)
	if !edges[0].Healthy || edges[0].Backlog != 0 || edges[1].Healthy {
		t.Fatalf("after the window: %+v", edges)
	}
}

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// A follower's part of a held pull: it waits on its own replica, and
// returns at a write for the edge (true) or at the end of the wait (false).
func TestAwaitPull(t *testing.T) {
	n := startService(t, Config{PullHold: 300 * time.Millisecond})
	ctx := context.Background()
	if _, err := n.svc.Push(ctx, "e1", &wire.PushBatch{Edge: "e1", FirstSeq: 1, Changes: []wire.Change{{Kind: wire.KindReadings,
		Device: "dev-e1", Readings: []wire.Reading{{TS: 1, Metrics: map[string]float64{"t": 1}}}}}}); err != nil {
		t.Fatal(err)
	}
	p, err := n.svc.Pull(ctx, "e1", PullRequest{Limit: 100, Have: &wire.SetVersions{}})
	if err != nil {
		t.Fatal(err)
	}
	req := PullRequest{Cursor: p.NextCursor, Limit: 100, Have: p.Versions, Wait: time.Minute}
	start := time.Now()
	if n.svc.AwaitPull(ctx, "e1", req) {
		t.Fatal("AwaitPull found news where there is none")
	}
	if d := time.Since(start); d < 250*time.Millisecond {
		t.Fatalf("AwaitPull returned after %s, want the 300ms hold", d)
	}
	// Stale versions: news at once.
	if !n.svc.AwaitPull(ctx, "e1", PullRequest{Cursor: p.NextCursor, Limit: 100, Have: &wire.SetVersions{Keys: "old"}, Wait: time.Minute}) {
		t.Fatal("AwaitPull did not see the key set move")
	}
	// A write for the edge while waiting.
	n2 := startService(t, Config{PullHold: 20 * time.Second})
	if _, err := n2.svc.Push(ctx, "e1", &wire.PushBatch{Edge: "e1", FirstSeq: 1, Changes: []wire.Change{{Kind: wire.KindReadings,
		Device: "dev-e1", Readings: []wire.Reading{{TS: 1, Metrics: map[string]float64{"t": 1}}}}}}); err != nil {
		t.Fatal(err)
	}
	p, err = n2.svc.Pull(ctx, "e1", PullRequest{Limit: 100, Have: &wire.SetVersions{}})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan bool, 1)
	go func() {
		done <- n2.svc.AwaitPull(ctx, "e1", PullRequest{Cursor: p.NextCursor, Limit: 100, Have: p.Versions, Wait: 20 * time.Second})
	}()
	deadline := time.Now().Add(10 * time.Second)
	for daemontest.Metric(t, n2.reg, "outpost_cloud_pulls_held") < 1 {
		if time.Now().After(deadline) {
			t.Fatal("the pull was not held")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if _, err := n2.svc.PutDesired(ctx, "dev-e1", map[string]json.RawMessage{"fan": json.RawMessage(`"on"`)}); err != nil {
		t.Fatal(err)
	}
	select {
	case news := <-done:
		if !news {
			t.Fatal("AwaitPull ended without news at a write for the edge")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("AwaitPull did not return at a write for the edge")
	}
}

// A held pull is woken by a change of an edge's durable facts or health,
// not by one of only its backlog class (a reconnect storm moves every
// edge's): that change still moves the directory's version, and the
// next pull brings it.
func TestDirectoryWakesHeldPulls(t *testing.T) {
	n := startService(t, Config{HeartbeatFresh: time.Minute})
	ctx := context.Background()
	beat := func(edge, region string, backlog uint64) { t.Helper(); n.beat(t, edge, region, backlog) }
	woken := func(ch <-chan struct{}) bool {
		select {
		case <-ch:
			return true
		default:
			return false
		}
	}
	beat("e1", "r", 2)
	beat("e2", "r", 2)
	held := n.svc.live.watch()
	n.svc.sweep()
	if !woken(held) {
		t.Fatal("new directory entries did not wake a held pull")
	}
	first, err := n.svc.Pull(ctx, "e1", PullRequest{Limit: 100, Have: &wire.SetVersions{}})
	if err != nil {
		t.Fatal(err)
	}

	held = n.svc.live.watch()
	beat("e2", "r", 50_000) // another backlog class
	n.svc.sweep()
	if woken(held) {
		t.Fatal("a backlog class change woke a held pull")
	}
	p, err := n.svc.Pull(ctx, "e1", PullRequest{Limit: 100, Have: first.Versions})
	if err != nil {
		t.Fatal(err)
	}
	if p.Directory == nil || len(p.Directory.Edges) != 1 || p.Directory.Edges[0].Backlog != 50_000 {
		t.Fatalf("the next pull after a backlog class change: %+v", p.Directory)
	}

	beat("e2", "moved", 50_000)
	n.svc.sweep()
	if !woken(held) {
		t.Fatal("a region change did not wake the held pull")
	}
}

// A pull whose directory version is older only by backlog or lag class
// changes is held like an empty one, and brings the delta when its wait
// ends; one older than a durable change returns at once. Without the first,
// edges under a reconnect storm (where some edge's backlog class moves
// every moment) pulled back to back.
func TestLoadOnlyDeltaIsHeld(t *testing.T) {
	n := startService(t, Config{HeartbeatFresh: time.Minute})
	ctx := context.Background()
	beat := func(edge, region string, backlog uint64) { t.Helper(); n.beat(t, edge, region, backlog) }
	beat("e1", "r", 2)
	beat("e2", "r", 2)
	n.svc.sweep()
	first, err := n.svc.Pull(ctx, "e1", PullRequest{Limit: 100, Have: &wire.SetVersions{}})
	if err != nil {
		t.Fatal(err)
	}
	pull := func(have *wire.SetVersions, wait time.Duration) (wire.PullPage, time.Duration) {
		t.Helper()
		start := time.Now()
		p, err := n.svc.Pull(ctx, "e1", PullRequest{Limit: 100, Have: have, Wait: wait})
		if err != nil {
			t.Fatal(err)
		}
		return p, time.Since(start)
	}

	beat("e2", "r", 50_000) // another backlog class only
	n.svc.sweep()
	const wait = 300 * time.Millisecond
	p, took := pull(first.Versions, wait)
	if took < wait {
		t.Fatalf("a pull older only by a backlog class change returned after %v, before its wait of %v", took, wait)
	}
	if p.Directory == nil || len(p.Directory.Edges) != 1 || p.Directory.Edges[0].Backlog != 50_000 || p.Versions.Directory == first.Versions.Directory {
		t.Fatalf("the held pull's page did not carry the backlog delta: %+v", p.Directory)
	}

	beat("e2", "moved", 50_000) // a durable fact: at once, even before a sweep
	p, took = pull(first.Versions, time.Minute)
	if took > 30*time.Second || p.Directory == nil || p.Directory.Edges[0].Region != "moved" {
		t.Fatalf("a pull older than a region change: %v, %+v", took, p.Directory)
	}
	// From the version that has the region change, the backlog class
	// change before it is old news: held again.
	beat("e2", "moved", 2)
	n.svc.sweep()
	if _, took = pull(p.Versions, wait); took < wait {
		t.Fatalf("a pull older only by a later backlog class change returned after %v", took)
	}
	// Another epoch's version is always news: the whole directory, at once.
	if p, took = pull(&wire.SetVersions{Directory: "other.5"}, time.Minute); took > 30*time.Second || p.Directory == nil || !p.Directory.Full {
		t.Fatalf("a pull of another epoch: %v, %+v", took, p.Directory)
	}
}

// The sweep recomputes entries only once some health can have changed by
// time alone (liveness.flipAt): an edge that fell silent, came back with a
// pull while no other edge was healthy (nothing due), and fell silent
// again is still seen going unhealthy, and a sweep before anything is due
// changes nothing.
func TestHealthFlipsAgainAfterReturn(t *testing.T) {
	n := startService(t, Config{HeartbeatFresh: time.Minute})
	ctx := context.Background()
	if _, err := n.svc.Heartbeat(ctx, "e1", &wire.Heartbeat{Region: "r"}); err != nil {
		t.Fatal(err)
	}
	healthy := func(what string, want bool) {
		t.Helper()
		n.svc.sweep()
		// The directory as edges pull it (Edges computes its own).
		if edges := n.svc.live.all(); len(edges) != 1 || edges[0].Healthy != want {
			t.Fatalf("%s: directory %+v, want healthy %v", what, edges, want)
		}
	}
	healthy("fresh heartbeat", true)
	n.offset.Store((30 * time.Second).Milliseconds())
	healthy("30 s later", true)
	n.offset.Store((2 * time.Minute).Milliseconds())
	healthy("silent past heartbeat_fresh", false)
	// Every edge unhealthy: nothing can flip by time alone until one is
	// heard from again.
	if _, err := n.svc.Pull(ctx, "e1", PullRequest{Limit: 10}); err != nil {
		t.Fatal(err)
	}
	healthy("back with a pull", true)
	n.offset.Store((4 * time.Minute).Milliseconds())
	healthy("silent again", false)
}

// beat sends a heartbeat of edge with region and backlog.
func (n *node) beat(t *testing.T, edge, region string, backlog uint64) {
	t.Helper()
	if _, err := n.svc.Heartbeat(context.Background(), edge, &wire.Heartbeat{Region: region, Backlog: backlog}); err != nil {
		t.Fatal(err)
	}
}
