package service

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/wire"
)

func alertJSON(t *testing.T, a rules.Alert) json.RawMessage {
	t.Helper()
	b, err := json.Marshal(a)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestAlertsAcrossEdges: over real raft, alerts pushed by two edges are
// listed with their edge and filtered by state, device and edge; a
// malformed alert refuses its batch; a re-sent copy changes nothing; an
// ack at the cloud is stored and reaches (only) the raising edge's pull as
// a KindAlert change; an edge's later clear keeps the cloud's ack.
func TestAlertsAcrossEdges(t *testing.T) {
	n := startService(t, Config{})
	ctx := context.Background()
	a1 := rules.Alert{ID: rules.AlertID("hot", "d1", 10), Rule: "hot", Device: "d1", State: rules.StateActive, StartedAt: 10, Stamp: hlc.New(10, 0)}
	a2 := rules.Alert{ID: rules.AlertID("hot", "d2", 20), Rule: "hot", Device: "d2", State: rules.StateActive, StartedAt: 20, Stamp: hlc.New(20, 0)}
	bad := a1
	bad.ID = "d9~hot~10"
	if _, err := n.svc.PushAlerts(ctx, "e1", &wire.AlertBatch{Alerts: []json.RawMessage{alertJSON(t, a1), alertJSON(t, bad)}}); !errors.Is(err, wire.ErrInvalid) {
		t.Fatalf("a batch with a malformed alert: %v", err)
	}
	if _, err := n.svc.PushAlerts(ctx, "e1", &wire.AlertBatch{Edge: "e2", Alerts: []json.RawMessage{alertJSON(t, a1)}}); !errors.Is(err, ErrWrongEdge) {
		t.Fatalf("alerts as another edge: %v", err)
	}
	for _, p := range []struct {
		edge string
		a    rules.Alert
		want int
	}{{"e1", a1, 1}, {"e2", a2, 1}, {"e1", a1, 0}} {
		res, err := n.svc.PushAlerts(ctx, p.edge, &wire.AlertBatch{Alerts: []json.RawMessage{alertJSON(t, p.a)}})
		if err != nil || res.Applied != p.want {
			t.Fatalf("push %s from %s: %+v %v, want %d applied", p.a.ID, p.edge, res, err, p.want)
		}
	}
	list := func(q fsm.AlertsQuery) []string {
		t.Helper()
		q.Limit = 10
		rs, err := n.svc.Alerts(ctx, q)
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, r := range rs {
			ids = append(ids, r.Edge+":"+r.ID)
		}
		return ids
	}
	if got := list(fsm.AlertsQuery{}); len(got) != 2 || got[0] != "e1:"+a1.ID || got[1] != "e2:"+a2.ID {
		t.Fatalf("all alerts: %v", got)
	}
	if got := list(fsm.AlertsQuery{Edge: "e2"}); len(got) != 1 || got[0] != "e2:"+a2.ID {
		t.Fatalf("e2's alerts: %v", got)
	}
	if got := list(fsm.AlertsQuery{Device: "d1", State: rules.StateActive}); len(got) != 1 {
		t.Fatalf("d1's active alerts: %v", got)
	}
	if got := list(fsm.AlertsQuery{After: a1.ID}); len(got) != 1 || got[0] != "e2:"+a2.ID {
		t.Fatalf("after a cursor: %v", got)
	}
	p0, err := n.svc.Pull(ctx, "e1", PullRequest{Limit: 100, Have: &wire.SetVersions{}})
	if err != nil {
		t.Fatal(err)
	}
	acked, err := n.svc.AckAlert(ctx, a1.ID, "ops")
	if err != nil || acked.State != rules.StateAcknowledged || acked.AckedBy != "ops" || acked.AckStamp == 0 {
		t.Fatalf("AckAlert: %+v %v", acked, err)
	}
	if _, err := n.svc.AckAlert(ctx, "d7~hot~1", "ops"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("ack of an unknown alert: %v", err)
	}
	p1, err := n.svc.Pull(ctx, "e1", PullRequest{Cursor: p0.NextCursor, Limit: 100, Have: p0.Versions})
	if err != nil {
		t.Fatal(err)
	}
	var down []rules.Alert
	for _, c := range p1.Changes {
		if c.Kind == wire.KindAlert {
			var a rules.Alert
			if err := json.Unmarshal(c.Alert, &a); err != nil {
				t.Fatal(err)
			}
			down = append(down, a)
		}
	}
	if len(down) != 1 || down[0].ID != a1.ID || down[0].AckedBy != "ops" {
		t.Fatalf("e1's pull after the ack: %+v", p1.Changes)
	}
	if p2, err := n.svc.Pull(ctx, "e2", PullRequest{Limit: 100, Have: &wire.SetVersions{}}); err != nil || len(p2.Changes) != 0 {
		t.Fatalf("e2's pull: %+v %v", p2.Changes, err)
	}
	// The edge clears it later (it had not seen the ack): the ack stays.
	cl := a1
	cl.ClearedAt, cl.ClearStamp = 50, hlc.New(hlc.Timestamp(acked.AckStamp).WallMs()+1, 0)
	if _, err := n.svc.PushAlerts(ctx, "e1", &wire.AlertBatch{Alerts: []json.RawMessage{alertJSON(t, cl)}}); err != nil {
		t.Fatal(err)
	}
	rs, err := n.svc.Alerts(ctx, fsm.AlertsQuery{Device: "d1", Limit: 10})
	if err != nil || len(rs) != 1 || rs[0].State != rules.StateCleared || rs[0].AckedBy != "ops" {
		t.Fatalf("after the edge's clear: %+v %v", rs, err)
	}
}

// countingNotifier fails each owner's first attempt, then counts sends.
type countingNotifier struct {
	mu       sync.Mutex
	failed   map[string]bool
	sent     map[string]int
	refusing string
}

func (c *countingNotifier) Notify(_ context.Context, openid string, n fsm.Notification) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if openid == c.refusing {
		return ErrNotifyRefused
	}
	key := n.Alert.ID + "/" + openid
	if !c.failed[key] {
		c.failed[key] = true
		return errors.New("busy")
	}
	c.sent[key]++
	return nil
}

// TestNotifyExactlyOnce: an alert from a distributed rule with a notify
// action, arriving for the first time, queues one notification for each
// owner of its device; the leader's notifier retries a failed send and
// sends each owner exactly once (re-sent copies and later transitions of
// the alert queue nothing more); a refused owner is not retried; an alert
// of a rule without notify queues nothing.
func TestNotifyExactlyOnce(t *testing.T) {
	nt := &countingNotifier{failed: map[string]bool{}, sent: map[string]int{}, refusing: "o-gone"}
	n := startService(t, Config{Notifier: nt})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := n.svc.PutMeta(ctx, "d1", wire.Meta{Owners: []string{"o-1", "o-2", "o-gone"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := n.svc.PutRule(ctx, rules.Rule{Name: "hot", When: "temp > 30", Actions: []rules.Action{{Notify: true}}}, ""); err != nil {
		t.Fatal(err)
	}
	if _, err := n.svc.PutRule(ctx, rules.Rule{Name: "quiet", When: "temp > 30"}, ""); err != nil {
		t.Fatal(err)
	}
	a := rules.Alert{ID: rules.AlertID("hot", "d1", 10), Rule: "hot", Device: "d1", State: rules.StateActive, StartedAt: 10, Stamp: hlc.New(10, 0)}
	q := rules.Alert{ID: rules.AlertID("quiet", "d1", 10), Rule: "quiet", Device: "d1", State: rules.StateActive, StartedAt: 10, Stamp: hlc.New(10, 0)}
	for range 2 { // a re-send
		if _, err := n.svc.PushAlerts(ctx, "e1", &wire.AlertBatch{Alerts: []json.RawMessage{alertJSON(t, a), alertJSON(t, q)}}); err != nil {
			t.Fatal(err)
		}
	}
	if qs, err := n.fsm.Notifications(10); err != nil || len(qs) != 1 || len(qs[0].Owners) != 3 {
		t.Fatalf("queue: %+v %v", qs, err)
	}
	done := make(chan struct{})
	go func() { defer close(done); n.svc.RunNotify(ctx, 20*time.Millisecond) }()
	deadline := time.Now().Add(20 * time.Second)
	for {
		qs, err := n.fsm.Notifications(10)
		if err != nil {
			t.Fatal(err)
		}
		if len(qs) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("queue not emptied: %+v", qs)
		}
		time.Sleep(10 * time.Millisecond)
	}
	// A later transition of the same alert queues nothing.
	cl := a
	cl.ClearedAt, cl.ClearStamp = 20, hlc.New(20, 0)
	if _, err := n.svc.PushAlerts(ctx, "e1", &wire.AlertBatch{Alerts: []json.RawMessage{alertJSON(t, cl)}}); err != nil {
		t.Fatal(err)
	}
	if qs, _ := n.fsm.Notifications(10); len(qs) != 0 {
		t.Fatalf("a later transition queued %+v", qs)
	}
	cancel()
	<-done
	nt.mu.Lock()
	defer nt.mu.Unlock()
	if len(nt.sent) != 2 || nt.sent[a.ID+"/o-1"] != 1 || nt.sent[a.ID+"/o-2"] != 1 {
		t.Fatalf("sent %v, want o-1 and o-2 once each", nt.sent)
	}
}

// TestAlertStampsScreened: an ack stamped far ahead of the cloud's clock
// (a bad edge clock) is kept with the oldest stamp and counted, so an ack
// made at the cloud afterwards still wins.
func TestAlertStampsScreened(t *testing.T) {
	n := startService(t, Config{})
	ctx := context.Background()
	now := n.clock.Now()
	a := rules.Alert{ID: rules.AlertID("hot", "d1", 10), Rule: "hot", Device: "d1", State: rules.StateActive, StartedAt: 10, Stamp: now}
	ahead := a
	ahead.AckedAt, ahead.AckedBy, ahead.AckStamp = 20, "skewed", hlc.New(now.WallMs()+int64(24*time.Hour/time.Millisecond), 0)
	res, err := n.svc.PushAlerts(ctx, "e1", &wire.AlertBatch{Alerts: []json.RawMessage{alertJSON(t, ahead)}})
	if err != nil || res.RejectedStamps != 1 {
		t.Fatalf("push with a stamp a day ahead: %+v %v", res, err)
	}
	acked, err := n.svc.AckAlert(ctx, a.ID, "ops")
	if err != nil || acked.AckedBy != "ops" || acked.State != rules.StateAcknowledged {
		t.Fatalf("the cloud's ack after a skewed one: %+v %v", acked, err)
	}
}
