package service

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/internal/daemontest"
	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/cloud/raftnode"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/shadow"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// maxDrift is the test nodes' HLC drift bound.
const maxDrift = time.Minute

// node is a service over a real one-node raft cluster (TCP transport and
// bbolt stores in a temp dir) that leads.
type node struct {
	svc      *Service
	fsm      *fsm.FSM
	raft     *raftnode.Node
	clock    *hlc.Clock
	reg      *prometheus.Registry
	raftAddr string
	offset   *atomic.Int64 // added to the service's wall clock, in ms
}

func startService(t *testing.T, cfg Config) *node {
	t.Helper()
	return startServiceRaft(t, cfg, raftnode.Config{})
}

// startServiceRaft is startService with the raft node's settings (its
// identity, addresses and data directory are the test's).
func startServiceRaft(t *testing.T, cfg Config, rc raftnode.Config) *node {
	t.Helper()
	dir := t.TempDir()
	discard := slog.New(slog.NewTextHandler(io.Discard, nil))
	f, err := fsm.Open(filepath.Join(dir, "state.db"), discard, fsm.Hooks{})
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	clock := hlc.NewClock(nil, maxDrift)
	reg := prometheus.NewRegistry()
	rc.ID, rc.RaftBind, rc.RaftAdvertise, rc.HTTPAdvertise = "n1", addr, addr, "127.0.0.1:1"
	rc.DataDir, rc.Bootstrap, rc.RaftLogLevel = dir, true, "error"
	rn, err := raftnode.New(rc, f, clock, discard, reg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); rn.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
		if err := rn.Shutdown(); err != nil {
			t.Error(err)
		}
		_ = f.Close()
	})
	deadline := time.Now().Add(10 * time.Second)
	for !rn.IsLeader() {
		if time.Now().After(deadline) {
			t.Fatal("no leadership within 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// A new leader records its own addresses through raft in the
	// background (raftnode's onLeader): wait for that entry, so that a
	// test counting applied entries starts after it
	// (TestHeartbeatsStayOffRaft saw it land among its heartbeats).
	for {
		nodes, err := f.Nodes()
		if err != nil {
			t.Fatal(err)
		}
		if nodes[rc.ID].HTTPAddr == rc.HTTPAdvertise {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the leader did not record its own addresses within 10s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	offset := new(atomic.Int64)
	if cfg.Now == nil {
		cfg.Now = func() time.Time { return time.Now().Add(time.Duration(offset.Load()) * time.Millisecond) }
	}
	return &node{svc: New(cfg, rn, f, clock, discard, reg), fsm: f, raft: rn, clock: clock, reg: reg, raftAddr: addr, offset: offset}
}

// batch is a push of n changes from first, each one reading of device dev.
func batch(edge string, first uint64, n int) *wire.PushBatch {
	b := &wire.PushBatch{Edge: edge, FirstSeq: first}
	for i := range n {
		seq := first + uint64(i)
		b.Changes = append(b.Changes, wire.Change{Kind: wire.KindReadings, Device: "dev",
			Readings: []wire.Reading{{TS: int64(seq), ID: fmt.Sprintf("r%d", seq), Metrics: map[string]float64{"v": float64(seq)}}}})
	}
	return b
}

func TestPushSequencing(t *testing.T) {
	n := startService(t, Config{})
	ctx := context.Background()
	steps := []struct {
		name          string
		b             *wire.PushBatch
		acked         uint64
		applied       int
		wantErr       error
		wantExpected  uint64
		pushesByLabel string
	}{
		{name: "first batch", b: batch("e1", 1, 3), acked: 3, applied: 3, pushesByLabel: "ok"},
		{name: "duplicate is acked without applying", b: batch("e1", 1, 3), acked: 3, applied: 0, pushesByLabel: "duplicate"},
		{name: "gap answers the expected sequence", b: batch("e1", 6, 1), wantErr: ErrSeqGap, wantExpected: 4, pushesByLabel: "gap"},
		// A re-send starts after a sequence the cloud acknowledged (the
		// edge resumes from its last recorded ack), so its overlap can be
		// checked against what was applied.
		{name: "overlapping replay applies only the new change", b: batch("e1", 1, 4), acked: 4, applied: 1, pushesByLabel: "ok"},
		{name: "next batch", b: batch("e1", 5, 2), acked: 6, applied: 2, pushesByLabel: "ok"},
		{name: "another edge has its own sequence", b: batch("e2", 1, 1), acked: 1, applied: 1, pushesByLabel: "ok"},
	}
	for _, st := range steps {
		before := daemontest.Metric(t, n.reg, "outpost_cloud_push_total", "edge", st.b.Edge, "result", st.pushesByLabel)
		out, err := n.svc.Push(ctx, st.b.Edge, st.b)
		if st.wantErr != nil {
			var gap *SeqGapError
			if !errors.Is(err, st.wantErr) || !errors.As(err, &gap) {
				t.Fatalf("%s: err = %v, want %v", st.name, err, st.wantErr)
			}
			if gap.Expected != st.wantExpected || gap.First != st.b.FirstSeq || gap.Edge != st.b.Edge {
				t.Fatalf("%s: gap = %+v, want expected %d", st.name, gap, st.wantExpected)
			}
		} else {
			if err != nil {
				t.Fatalf("%s: %v", st.name, err)
			}
			if out.AckedSeq != st.acked || out.Applied != st.applied || out.Duplicates != 0 {
				t.Fatalf("%s: result %+v, want acked %d applied %d", st.name, out.PushResult, st.acked, st.applied)
			}
		}
		if got := daemontest.Metric(t, n.reg, "outpost_cloud_push_total", "edge", st.b.Edge, "result", st.pushesByLabel); got != before+1 {
			t.Fatalf("%s: outpost_cloud_push_total{result=%q} went %v → %v", st.name, st.pushesByLabel, before, got)
		}
	}
	// Every reading of e1 landed once.
	items, _, err := n.svc.Readings(ctx, fsm.ReadingsQuery{Device: "dev", Limit: 100})
	if err != nil {
		t.Fatal(err)
	}
	if len(items) != 7 {
		t.Fatalf("%d readings stored, want 7 (6 from e1, 1 from e2): %+v", len(items), items)
	}
	if got := n.fsm.EdgeSeq("e1"); got != 6 {
		t.Fatalf("e1 acked seq = %d, want 6", got)
	}
}

func TestPushRefusesBadBatches(t *testing.T) {
	n := startService(t, Config{})
	ctx := context.Background()
	if _, err := n.svc.Push(ctx, "e1", batch("e2", 1, 1)); !errors.Is(err, ErrWrongEdge) {
		t.Fatalf("push as another edge: err = %v, want ErrWrongEdge", err)
	}
	if _, err := n.svc.Push(ctx, "e1", batch("e1", 0, 1)); !errors.Is(err, wire.ErrInvalid) {
		t.Fatalf("first_seq 0: err = %v, want wire.ErrInvalid", err)
	}
	if got := n.fsm.EdgeSeq("e1"); got != 0 {
		t.Fatalf("a refused batch moved the sequence to %d", got)
	}
}

// TestPushPipelined sends an edge's batches two at a time, the second racing
// the first: both land in order, whichever reaches the gate first (the gate
// itself is TestSeqGate).
func TestPushPipelined(t *testing.T) {
	n := startService(t, Config{})
	ctx := context.Background()
	for round := range 5 {
		first := uint64(round*6 + 1)
		second := make(chan error, 1)
		go func() {
			_, err := n.svc.Push(ctx, "e1", batch("e1", first+3, 3))
			second <- err
		}()
		if _, err := n.svc.Push(ctx, "e1", batch("e1", first, 3)); err != nil {
			t.Fatalf("round %d: first batch: %v", round, err)
		}
		if err := <-second; err != nil {
			t.Fatalf("round %d: second batch: %v", round, err)
		}
	}
	if got := n.fsm.EdgeSeq("e1"); got != 30 {
		t.Fatalf("acked seq = %d, want 30", got)
	}
}

func TestPushStampDrift(t *testing.T) {
	n := startService(t, Config{})
	ctx := context.Background()
	now := n.clock.Now()
	future := hlc.New(time.Now().Add(time.Hour).UnixMilli(), 0)
	b := &wire.PushBatch{Edge: "e1", FirstSeq: 1, Changes: []wire.Change{
		{Kind: wire.KindReported, Device: "dev", Doc: shadow.Doc{
			"temp":   {Value: []byte("21"), Stamp: now},
			"future": {Value: []byte("1"), Stamp: future},
		}},
		{Kind: wire.KindMeta, Device: "dev", Meta: &wire.Meta{Region: "north", Stamp: future}},
	}}
	out, err := n.svc.Push(ctx, "e1", b)
	if err != nil {
		t.Fatal(err)
	}
	if out.RejectedStamps != 2 || out.Stamps.Dropped() != 2 {
		t.Fatalf("rejected %d (report %d), want 2", out.RejectedStamps, out.Stamps.Dropped())
	}
	var field, meta *StampDrop
	for i, d := range out.Stamps.Drops {
		if !errors.Is(d.Reason, hlc.ErrDrift) || d.Stamp != future || d.Device != "dev" {
			t.Fatalf("drop %+v: want a drift reason for dev's future stamp", d)
		}
		switch d.Kind {
		case wire.KindReported:
			field = &out.Stamps.Drops[i]
		case wire.KindMeta:
			meta = &out.Stamps.Drops[i]
		}
	}
	if field == nil || field.Field != "future" || meta == nil || meta.Field != "" {
		t.Fatalf("drops %+v: want the reported field \"future\" and the meta record", out.Stamps.Drops)
	}
	if got := daemontest.Metric(t, n.reg, "outpost_cloud_rejected_stamps_total", "edge", "e1"); got != 2 {
		t.Fatalf("outpost_cloud_rejected_stamps_total = %v, want 2", got)
	}
	// The clock did not adopt the future stamp.
	if n.clock.Now() >= future {
		t.Fatal("the clock adopted a stamp beyond the drift bound")
	}
	d, err := n.svc.Device(ctx, "dev")
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := d.Reported["future"]; ok {
		t.Fatal("the future field was stored")
	}
	if _, ok := d.Reported["temp"]; !ok {
		t.Fatal("the field within the drift bound was dropped")
	}
	// The meta record is demoted, and then refused under edge
	// restriction (it carries no proof): the cloud keeps its own.
	if d.Region != "" || out.RefusedReasons[RefuseNoProof] != 1 {
		t.Fatalf("meta region %q, refused %v: want the unproven meta refused", d.Region, out.RefusedReasons)
	}
	if d, err = n.svc.PutMeta(ctx, "dev", wire.Meta{Region: "south"}); err != nil || d.Region != "south" {
		t.Fatalf("a cloud write after the demoted meta: region %q, err %v", d.Region, err)
	}

	// The state batch goes through the same policy.
	sb := &wire.StateBatch{Changes: []wire.Change{{Kind: wire.KindReported, Device: "dev", Doc: shadow.Doc{
		"future2": {Value: []byte("1"), Stamp: future}, "humid": {Value: []byte("40"), Stamp: n.clock.Now()}}}}}
	so, err := n.svc.State(ctx, "e1", sb)
	if err != nil {
		t.Fatal(err)
	}
	if so.RejectedStamps != 1 || so.Stamps.Drops[0].Field != "future2" {
		t.Fatalf("state result %+v drops %+v, want future2 rejected", so.StateResult, so.Stamps.Drops)
	}
}

func TestStampPolicyScreen(t *testing.T) {
	wall := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	ok := hlc.New(wall.UnixMilli(), 0)
	ahead := hlc.New(wall.Add(2*maxDrift).UnixMilli(), 0)
	cases := []struct {
		name     string
		drift    time.Duration
		change   wire.Change
		dropped  int
		wantDoc  []string      // fields left
		wantMeta hlc.Timestamp // meta or user stamp after
	}{
		{name: "fields within the bound stay", drift: maxDrift,
			change:  wire.Change{Kind: wire.KindReported, Doc: shadow.Doc{"a": {Stamp: ok}, "b": {Stamp: ok}}},
			wantDoc: []string{"a", "b"}},
		{name: "a field ahead is dropped", drift: maxDrift, dropped: 1,
			change:  wire.Change{Kind: wire.KindDesired, Doc: shadow.Doc{"a": {Stamp: ok}, "b": {Stamp: ahead}}},
			wantDoc: []string{"a"}},
		{name: "meta ahead is demoted", drift: maxDrift, dropped: 1,
			change: wire.Change{Kind: wire.KindMeta, Meta: &wire.Meta{Stamp: ahead}}, wantMeta: demoted},
		{name: "user ahead is demoted", drift: maxDrift, dropped: 1,
			change: wire.Change{Kind: wire.KindUser, User: &wire.User{OpenID: "o", Stamp: ahead}}, wantMeta: demoted},
		{name: "unstamped meta is left alone", drift: maxDrift,
			change: wire.Change{Kind: wire.KindMeta, Meta: &wire.Meta{}}, wantMeta: 0},
		{name: "no bound trusts everything", drift: 0,
			change:  wire.Change{Kind: wire.KindReported, Doc: shadow.Doc{"b": {Stamp: ahead}}},
			wantDoc: []string{"b"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := StampPolicy{Clock: hlc.NewClock(func() time.Time { return wall }, tc.drift)}
			changes := []wire.Change{tc.change}
			rep, err := p.Screen(changes)
			if err != nil {
				t.Fatal(err)
			}
			if rep.Dropped() != tc.dropped {
				t.Fatalf("dropped %d, want %d: %+v", rep.Dropped(), tc.dropped, rep.Drops)
			}
			for _, d := range rep.Drops {
				if !errors.Is(d.Reason, hlc.ErrDrift) || d.Stamp != ahead {
					t.Fatalf("drop %+v: want the ahead stamp with a drift reason", d)
				}
			}
			c := changes[0]
			if len(c.Doc) != len(tc.wantDoc) {
				t.Fatalf("doc %v, want fields %v", c.Doc, tc.wantDoc)
			}
			for _, f := range tc.wantDoc {
				if _, ok := c.Doc[f]; !ok {
					t.Fatalf("doc %v lost %q", c.Doc, f)
				}
			}
			switch {
			case c.Meta != nil && c.Meta.Stamp != tc.wantMeta:
				t.Fatalf("meta stamp %v, want %v", c.Meta.Stamp, tc.wantMeta)
			case c.User != nil && c.User.Stamp != tc.wantMeta:
				t.Fatalf("user stamp %v, want %v", c.User.Stamp, tc.wantMeta)
			}
			// Trusted stamps were folded into the clock.
			if tc.dropped == 0 && len(c.Doc) > 0 && p.Clock.Last() < c.Doc[tc.wantDoc[0]].Stamp {
				t.Fatal("the clock did not fold in a trusted stamp")
			}
		})
	}
}

func TestMembershipErrors(t *testing.T) {
	n := startService(t, Config{})
	ctx := context.Background()
	cases := []struct {
		name             string
		id, raft, httpAd string
		want             error
	}{
		{name: "same id at another address", id: "n1", raft: "127.0.0.1:1", httpAd: "127.0.0.1:2", want: ErrConflict},
		{name: "another id at a member's address", id: "n2", raft: n.raftAddr, httpAd: "127.0.0.1:2", want: ErrConflict},
		{name: "repeating a member's own join succeeds", id: "n1", raft: n.raftAddr, httpAd: "127.0.0.1:1", want: nil},
	}
	for _, tc := range cases {
		err := n.svc.Join(ctx, tc.id, tc.raft, tc.httpAd)
		if !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
			t.Fatalf("%s: err = %v, want %v", tc.name, err, tc.want)
		}
		// The conflict names what is taken (clients see this text).
		if tc.want != nil && !errors.Is(err, raftnode.ErrConflict) {
			t.Fatalf("%s: err %v lost raftnode's cause", tc.name, err)
		}
	}
	if err := n.svc.Remove(ctx, "ghost"); !errors.Is(err, ErrNoSuchNode) {
		t.Fatalf("remove a non-member: err = %v, want ErrNoSuchNode", err)
	}
	st, err := n.svc.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Nodes) != 1 || st.Nodes[0].ID != "n1" || st.Nodes[0].State != "leader" || st.Leader != "n1" {
		t.Fatalf("status %+v, want n1 alone as leader", st)
	}
	if applied, err := n.svc.Snapshot(ctx); err != nil || applied == 0 {
		t.Fatalf("snapshot: applied %d, err %v", applied, err)
	}
}

func TestConsumerReadsAndWrites(t *testing.T) {
	n := startService(t, Config{HeartbeatFresh: 90 * time.Second})
	ctx := context.Background()
	if _, err := n.svc.Device(ctx, "nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown device: err = %v, want ErrNotFound", err)
	}
	if _, err := n.svc.User(ctx, "nobody"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown user: err = %v, want ErrNotFound", err)
	}
	d, err := n.svc.PutDesired(ctx, "dev", map[string]json.RawMessage{"fan": json.RawMessage(`"on"`)})
	if err != nil {
		t.Fatal(err)
	}
	if string(d.Desired.State()["fan"]) != `"on"` || d.Desired.Version().IsZero() {
		t.Fatalf("desired after write: %+v", d.Desired)
	}
	if d, err = n.svc.PutMeta(ctx, "dev", wire.Meta{Region: "r1", Tags: wire.Tags{"a": "1"}}); err != nil || d.Region != "r1" || d.MetaStamp.IsZero() {
		t.Fatalf("meta after write: %+v, err %v", d, err)
	}
	u, err := n.svc.PutUser(ctx, wire.User{OpenID: "alice", Roles: []string{"viewer"}})
	if err != nil || u.Stamp.IsZero() {
		t.Fatalf("put user: %+v, err %v", u, err)
	}
	if got, err := n.svc.User(ctx, "alice"); err != nil || len(got.Roles) != 1 || got.Roles[0] != "viewer" {
		t.Fatalf("user: %+v, err %v", got, err)
	}
	if err := n.svc.PutPolicy(ctx, wire.Policy{Name: "a.rego", Rego: "package a"}); err != nil {
		t.Fatal(err)
	}
	if ps, err := n.svc.Policies(ctx); err != nil || len(ps) != 1 || ps[0].Name != "a.rego" {
		t.Fatalf("policies: %+v, err %v", ps, err)
	}

	// Heartbeat: the directory shows the edge healthy until HeartbeatFresh
	// passes, and the deployment key exists for the pull.
	if _, err := n.svc.Heartbeat(ctx, "e1", &wire.Heartbeat{Edge: "e2"}); !errors.Is(err, ErrWrongEdge) {
		t.Fatalf("heartbeat as another edge: err = %v, want ErrWrongEdge", err)
	}
	if _, err := n.svc.Heartbeat(ctx, "e1", &wire.Heartbeat{Backlog: 3}); err != nil {
		t.Fatal(err)
	}
	edges, err := n.svc.Edges(ctx)
	if err != nil || len(edges) != 1 || edges[0].ID != "e1" || !edges[0].Healthy {
		t.Fatalf("edges: %+v, err %v", edges, err)
	}
	n.offset.Store((2 * time.Minute).Milliseconds())
	if edges, _ = n.svc.Edges(ctx); edges[0].Healthy {
		t.Fatal("an edge silent for longer than HeartbeatFresh is healthy")
	}
	n.offset.Store(0)
	page, err := n.svc.Pull(ctx, "e1", PullRequest{Limit: 100})
	if err != nil {
		t.Fatal(err)
	}
	if len(page.Keys) == 0 || len(page.Edges) != 1 || len(page.Policies) != 1 || page.ServerTimeMs == 0 {
		t.Fatalf("pull page: keys %s, %d edges, %d policies", page.Keys, len(page.Edges), len(page.Policies))
	}
	if _, err := n.svc.Pull(ctx, "e1", PullRequest{Cursor: "not-a-cursor", Limit: 100}); !errors.Is(err, ErrBadCursor) {
		t.Fatalf("pull with a bad cursor: err = %v, want ErrBadCursor", err)
	}

	if _, err := n.svc.Export(ctx, "x.y.z", 10, func(*fsm.ExportRecord) error { return nil }); !errors.Is(err, ErrBadCursor) {
		t.Fatalf("export with a bad cursor: err = %v, want ErrBadCursor", err)
	}
	records := 0
	next, err := n.svc.Export(ctx, "", 1000, func(*fsm.ExportRecord) error { records++; return nil })
	if err != nil || records == 0 || next == "" {
		t.Fatalf("export: %d records, next %q, err %v", records, next, err)
	}
}

// TestKind checks the one translation of the lower layers' sentinels: the
// service's kind for callers, the cause and text kept.
func TestKind(t *testing.T) {
	cases := []struct {
		in   error
		want error
	}{
		{raftnode.ErrNotLeader, ErrNotLeader},
		{raftnode.ErrOverloaded, ErrOverloaded},
		{&raftnode.OverloadError{RetryAfter: 3 * time.Second, Reason: "queue full"}, ErrOverloaded},
		{raftnode.ErrUnknownOutcome, ErrUnknownOutcome},
		{raftnode.ErrStopped, ErrUnknownOutcome},
		{context.DeadlineExceeded, ErrUnknownOutcome},
		{fmt.Errorf("%w: node %q", raftnode.ErrConflict, "n1"), ErrConflict},
		{fmt.Errorf("%w: %q", raftnode.ErrNoSuchNode, "n9"), ErrNoSuchNode},
		{fsm.ErrNotFound, ErrNotFound},
		{fsm.ErrBadCursor, ErrBadCursor},
		{&fsm.CompactedError{Cursor: "1.0", Earliest: "7"}, ErrCompacted},
	}
	for _, tc := range cases {
		got := kind(tc.in)
		if !errors.Is(got, tc.want) || !errors.Is(got, tc.in) || got.Error() != tc.in.Error() {
			t.Errorf("kind(%v) = %v: want kind %v, cause and text kept", tc.in, got, tc.want)
		}
	}
	other := errors.New("disk full")
	if kind(other) != other || kind(nil) != nil {
		t.Error("kind changed an error it does not translate")
	}
}
