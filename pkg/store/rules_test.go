package store

import (
	"bytes"
	"encoding/json"
	"fmt"
	"reflect"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/rules"
)

func alertEvent(kind rules.EventKind, rule, dev, state string, started int64) rules.Event {
	a := &rules.Alert{ID: rules.AlertID(rule, dev, started), Rule: rule, Device: dev, State: state,
		StartedAt: started, Stamp: hlc.New(started, 0)}
	return rules.Event{Kind: kind, State: rules.State{Key: rules.Key{Rule: rule, Device: dev}, Version: "v", Alert: a}, Alert: a}
}

// TestRuleStatesAndAlerts: what SaveRuleEvents writes is what RuleStates,
// Alert and Alerts read back, after a reopen; an ended state is deleted;
// the alert index follows state changes.
func TestRuleStatesAndAlerts(t *testing.T) {
	s := openTestStore(t, "", Options{})
	pending := rules.Event{Kind: rules.Pending, State: rules.State{Key: rules.Key{Rule: "cold", Device: "b"}, Version: "v", PendingSince: 7, Value: -2}}
	evs := []rules.Event{
		alertEvent(rules.Fired, "hot", "a", rules.StateActive, 1),
		alertEvent(rules.Fired, "hot", "b", rules.StateActive, 2),
		alertEvent(rules.Fired, "loud", "a", rules.StateActive, 3),
		pending,
	}
	if err := s.SaveRuleEvents(5, evs); err != nil {
		t.Fatal(err)
	}
	cleared := alertEvent(rules.Cleared, "loud", "a", rules.StateCleared, 3)
	if err := s.SaveRuleEvents(4, []rules.Event{cleared}); err != nil { // an older position: kept at 5
		t.Fatal(err)
	}
	s = reopen(t, s)
	seq, states, err := s.RuleStates()
	if err != nil || seq != 5 {
		t.Fatalf("RuleStates: seq %d, %v", seq, err)
	}
	if len(states) != 3 || states[0].Rule != "cold" || states[0].PendingSince != 7 || states[0].Value != -2 {
		t.Fatalf("states %+v: want cold/b pending, hot/a, hot/b (loud/a ended)", states)
	}
	for _, tc := range []struct {
		q    AlertsQuery
		want []string
	}{
		{AlertsQuery{Limit: 10}, []string{"a~hot~1", "a~loud~3", "b~hot~2"}},
		{AlertsQuery{Device: "a", Limit: 10}, []string{"a~hot~1", "a~loud~3"}},
		{AlertsQuery{State: rules.StateActive, Limit: 10}, []string{"a~hot~1", "b~hot~2"}},
		{AlertsQuery{State: rules.StateCleared, Device: "a", Limit: 10}, []string{"a~loud~3"}},
		{AlertsQuery{State: rules.StateActive, Device: "b", Limit: 10}, []string{"b~hot~2"}},
		{AlertsQuery{Limit: 1, After: "a~hot~1"}, []string{"a~loud~3"}},
		{AlertsQuery{State: rules.StateActive, Limit: 10, After: "a~hot~1"}, []string{"b~hot~2"}},
		{AlertsQuery{Device: "c", Limit: 10}, nil},
		{AlertsQuery{Device: "a", State: rules.StateAcknowledged, Limit: 10}, nil},
	} {
		got, err := s.Alerts(tc.q)
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, a := range got {
			ids = append(ids, a.ID)
		}
		if len(ids) != len(tc.want) || (len(ids) > 0 && join(ids) != join(tc.want)) {
			t.Errorf("Alerts(%+v) = %v, want %v", tc.q, ids, tc.want)
		}
	}
	// An ack merged into a stored alert moves its index entry.
	a, err := s.MergeAlert(rules.Alert{ID: "a~hot~1", AckedAt: 9, AckedBy: "alice", AckStamp: hlc.New(9, 0)})
	if err != nil || a.State != rules.StateAcknowledged {
		t.Fatalf("MergeAlert: %+v %v", a, err)
	}
	if got, _ := s.Alerts(AlertsQuery{State: rules.StateActive, Limit: 10}); len(got) != 1 || got[0].ID != "b~hot~2" {
		t.Fatalf("active after the ack: %+v", got)
	}
	if _, err := s.MergeAlert(rules.Alert{ID: "z~x~1"}); err != ErrNotFound {
		t.Fatalf("MergeAlert of a missing alert: %v", err)
	}
}

func join(s []string) string {
	out := ""
	for _, x := range s {
		out += x + ","
	}
	return out
}

// TestOutboxHeldForRules: with HoldOutboxForRules an acknowledged entry
// stays until the rule runner has passed it (so a runner that fell behind
// catches up from the outbox), the lag the edge reports ignores it, and
// without the option nothing changes.
func TestOutboxHeldForRules(t *testing.T) {
	for _, hold := range []bool{true, false} {
		s := openTestStore(t, "", Options{HoldOutboxForRules: hold})
		for i := range 3 {
			mustIngest(t, s, item("d", reading(t0+int64(i), "", "t", 1.0)))
		}
		if err := s.AckOutbox(3); err != nil {
			t.Fatal(err)
		}
		left, err := s.Outbox(0, 10, 1<<20)
		if err != nil {
			t.Fatal(err)
		}
		if want := map[bool]int{true: 3, false: 0}[hold]; len(left) != want {
			t.Fatalf("hold=%v: %d entries left after the ack, want %d", hold, len(left), want)
		}
		if ts, _ := s.OldestUnsynced(); ts != 0 {
			t.Fatalf("hold=%v: oldest unsynced %v after everything was acked", hold, ts)
		}
		if err := s.SaveRuleEvents(2, nil); err != nil {
			t.Fatal(err)
		}
		left, _ = s.Outbox(0, 10, 1<<20)
		if want := map[bool]int{true: 1, false: 0}[hold]; len(left) != want {
			t.Fatalf("hold=%v: %d entries left after the runner passed 2, want %d", hold, len(left), want)
		}
		// The runner ahead of the cloud: the ack decides.
		mustIngest(t, s, item("d", reading(t0+10, "", "t", 1.0)))
		if err := s.SaveRuleEvents(4, nil); err != nil {
			t.Fatal(err)
		}
		if left, _ = s.Outbox(0, 10, 1<<20); len(left) != 1 || left[0].Seq != 4 {
			t.Fatalf("hold=%v: the unsynced entry must stay: %+v", hold, left)
		}
	}
}

// TestAlertOutbox: every stored transition queues the alert's latest value
// (one entry per alert, survives a reopen); AlertsSent removes what the
// cloud took, but not an entry a later transition replaced meanwhile.
func TestAlertOutbox(t *testing.T) {
	s := openTestStore(t, "", Options{})
	if err := s.SaveRuleEvents(1, []rules.Event{
		alertEvent(rules.Fired, "hot", "a", rules.StateActive, 1),
		alertEvent(rules.Fired, "hot", "b", rules.StateActive, 2),
	}); err != nil {
		t.Fatal(err)
	}
	s = reopen(t, s)
	sent, err := s.PendingAlerts(10)
	if err != nil || len(sent) != 2 || sent[0].ID != "a~hot~1" || sent[1].State != rules.StateActive {
		t.Fatalf("pending after firing: %+v %v", sent, err)
	}
	// While they travel, a~hot~1 is acknowledged.
	if _, err := s.MergeAlert(rules.Alert{ID: "a~hot~1", AckedAt: 9, AckedBy: "alice", AckStamp: hlc.New(9, 0)}); err != nil {
		t.Fatal(err)
	}
	if err := s.AlertsSent(sent); err != nil {
		t.Fatal(err)
	}
	left, err := s.PendingAlerts(10)
	if err != nil || len(left) != 1 || left[0].ID != "a~hot~1" || left[0].State != rules.StateAcknowledged || left[0].AckedBy != "alice" {
		t.Fatalf("pending after the first send: %+v %v", left, err)
	}
	if err := s.AlertsSent(left); err != nil {
		t.Fatal(err)
	}
	if left, err := s.PendingAlerts(10); err != nil || len(left) != 0 {
		t.Fatalf("pending after the second send: %+v %v", left, err)
	}
}

// TestIngestCarriesRuleSaves: a rule save riding an ingest commit saves
// what SaveRuleEvents saves (states, alerts, position; never backwards),
// and deletes one trim chunk of the held outbox per commit, reporting
// OutboxTrimPending until a commit finds nothing more to delete.
func TestIngestCarriesRuleSaves(t *testing.T) {
	s := openTestStore(t, "", Options{HoldOutboxForRules: true, NoSync: true})
	const n = 10001 // one more than a trim chunk
	// A batch writes one readings entry per device: batches of 50
	// devices, one entry each.
	for i := 0; i < n; i += 50 {
		var items []Item
		for j := i; j < min(i+50, n); j++ {
			items = append(items, item(fmt.Sprintf("d%d", j%50), reading(t0+int64(j), "", "t", 1.0)))
		}
		mustIngest(t, s, items...)
	}
	if err := s.AckOutbox(n); err != nil {
		t.Fatal(err)
	}
	fired := alertEvent(rules.Fired, "hot", "d1", rules.StateActive, 1)
	if _, err := s.Ingest([]Item{item("d1", reading(t0+n, "", "t", 2.0))}, nil,
		RuleSave{Seq: 3, Events: []rules.Event{fired}}, RuleSave{Seq: n, Events: nil}, RuleSave{Seq: 5}); err != nil {
		t.Fatal(err)
	}
	seq, states, err := s.RuleStates()
	if err != nil || seq != n || len(states) != 1 || states[0].Rule != "hot" {
		t.Fatalf("RuleStates after the commit: %d %+v %v", seq, states, err)
	}
	if a, err := s.Alert(fired.Alert.ID); err != nil || a.State != rules.StateActive {
		t.Fatalf("the alert of the save: %+v %v", a, err)
	}
	if !s.OutboxTrimPending() {
		t.Fatal("one chunk deleted of more: OutboxTrimPending must say so")
	}
	left, _ := s.Outbox(0, 10, 1<<20)
	if len(left) == 0 || left[0].Seq != n {
		t.Fatalf("after one chunk the outbox starts at %+v, want seq %d", left[:min(len(left), 1)], n)
	}
	if _, err := s.Ingest(nil, nil, RuleSave{Seq: n}); err != nil {
		t.Fatal(err)
	}
	if s.OutboxTrimPending() {
		t.Fatal("the second commit deleted the rest, yet a trim is pending")
	}
	if left, _ = s.Outbox(0, 10, 1<<20); len(left) != 1 || left[0].Seq != n+1 {
		t.Fatalf("outbox after the trim: %+v, want only the unacked %d", left, n+1)
	}
}

// TestOlderRuleLayoutReads: a file of an older release, whose alert outbox
// was alert_out (id → a copy of the alert) and whose rule states held a
// copy of their open alert, opens with the same pending alerts, states and
// alerts by state; alert_out and the cleared alert's index entry are gone, and an ack stored afterwards (which
// leaves the state's value as it was) is what the state reads back.
func TestOlderRuleLayoutReads(t *testing.T) {
	s := openTestStore(t, "", Options{})
	a := alertEvent(rules.Fired, "hot", "a", rules.StateActive, 1)
	b := alertEvent(rules.Fired, "hot", "b", rules.StateCleared, 2)
	b.State.Alert.ClearedAt, b.State.Alert.ClearStamp = 3, hlc.New(3, 0)
	wantStates := []rules.State{a.State}
	wantPending := []rules.Alert{*a.Alert, *b.Alert}
	err := s.DB().Update(func(tx *bolt.Tx) error {
		if err := tx.DeleteBucket(bucketAlertQ); err != nil {
			return err
		}
		out, err := tx.CreateBucket(legacyAlertOut)
		if err != nil {
			return err
		}
		for _, al := range wantPending {
			v, _ := json.Marshal(al)
			if err := tx.Bucket(bucketAlerts).Put([]byte(al.ID), v); err != nil {
				return err
			}
			if err := out.Put([]byte(al.ID), v); err != nil {
				return err
			}
			if err := tx.Bucket(bucketAlertIdx).Put(alertIdxKey(al.State, al.ID), nil); err != nil {
				return err
			}
		}
		v, _ := json.Marshal(a.State) // the older encoding: rules.State itself
		return tx.Bucket(bucketRuleState).Put(ruleStateKey(a.State.Key), v)
	})
	if err != nil {
		t.Fatal(err)
	}
	s = reopen(t, s)
	if err := s.DB().View(func(tx *bolt.Tx) error {
		if tx.Bucket(legacyAlertOut) != nil {
			t.Error("alert_out still there after Open")
		}
		if tx.Bucket(bucketAlertIdx).Get(alertIdxKey(rules.StateCleared, "b~hot~2")) != nil {
			t.Error("the index entry of a cleared alert is still there after Open")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	pending, err := s.PendingAlerts(10)
	if err != nil || !reflect.DeepEqual(pending, wantPending) {
		t.Fatalf("pending alerts of the older file: %+v %v, want %+v", pending, err, wantPending)
	}
	_, states, err := s.RuleStates()
	if err != nil || !reflect.DeepEqual(states, wantStates) {
		t.Fatalf("rule states of the older file: %+v %v, want %+v", states, err, wantStates)
	}
	for state, want := range map[string]rules.Alert{rules.StateActive: wantPending[0], rules.StateCleared: wantPending[1]} {
		if got, err := s.Alerts(AlertsQuery{State: state, Limit: 10}); err != nil || len(got) != 1 || got[0] != want {
			t.Errorf("%s alerts of the older file: %+v %v, want %+v", state, got, err, want)
		}
	}
	acked := *a.Alert
	acked.Merge(rules.Alert{AckedAt: 4, AckedBy: "bob", AckStamp: hlc.New(4, 0)})
	st := a.State
	st.Alert = &acked
	if err := s.SaveRuleEvents(1, []rules.Event{{Kind: rules.Changed, State: st, Alert: &acked}}); err != nil {
		t.Fatal(err)
	}
	s = reopen(t, s)
	if _, states, err := s.RuleStates(); err != nil || len(states) != 1 || *states[0].Alert != acked {
		t.Fatalf("rule states after an ack: %+v %v, want the acked alert", states, err)
	}
}

// TestAlertQueue: a rule state names its open alert instead of holding a
// copy; alert_index holds open alerts only, and the cleared query finds
// them in the alerts bucket; an alert that changed twice while the cloud was away is queued
// twice and pending once, with its latest value; AlertsSent of that value
// empties the queue.
func TestAlertQueue(t *testing.T) {
	s := openTestStore(t, "", Options{})
	fired := alertEvent(rules.Fired, "hot", "a", rules.StateActive, 1)
	if err := s.SaveRuleEvents(1, []rules.Event{fired}); err != nil {
		t.Fatal(err)
	}
	if err := s.DB().View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketRuleState).Get(ruleStateKey(fired.State.Key))
		if !bytes.Contains(v, []byte(`"alert_id":"a~hot~1"`)) || bytes.Contains(v, []byte(`"alert":`)) {
			t.Errorf("stored state %s: want the alert by id, not a copy", v)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	cleared := *fired.Alert
	cleared.Merge(rules.Alert{ClearedAt: 5, ClearStamp: hlc.New(5, 0)})
	if err := s.SaveRuleEvents(2, []rules.Event{{Kind: rules.Cleared, State: rules.State{Key: fired.State.Key}, Alert: &cleared}}); err != nil {
		t.Fatal(err)
	}
	queued, idx := 0, 0
	s.DB().View(func(tx *bolt.Tx) error {
		queued, idx = tx.Bucket(bucketAlertQ).Stats().KeyN, tx.Bucket(bucketAlertIdx).Stats().KeyN
		return nil
	})
	if idx != 0 {
		t.Errorf("%d index entries after the clear: the index holds open alerts only", idx)
	}
	if got, err := s.Alerts(AlertsQuery{State: rules.StateCleared, Device: "a", Limit: 10}); err != nil || len(got) != 1 || got[0] != cleared {
		t.Errorf("cleared alerts of a: %+v %v", got, err)
	}
	pending, err := s.PendingAlerts(10)
	if err != nil || queued != 2 || len(pending) != 1 || pending[0] != cleared {
		t.Fatalf("%d queued, pending %+v %v: want 2 queued, the cleared alert pending once", queued, pending, err)
	}
	if err := s.AlertsSent(pending); err != nil {
		t.Fatal(err)
	}
	s.DB().View(func(tx *bolt.Tx) error { queued = tx.Bucket(bucketAlertQ).Stats().KeyN; return nil })
	if pending, err := s.PendingAlerts(10); err != nil || len(pending) != 0 || queued != 0 {
		t.Fatalf("after the send: %d queued, pending %+v %v", queued, pending, err)
	}
}
