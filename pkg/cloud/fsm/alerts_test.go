package fsm

import (
	"encoding/json"
	"testing"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// TestAlertsMergeDeterministic: the same copies of an alert applied in
// different orders (an edge's ack, clear and fire; the cloud's ack) leave
// two replicas with equal alerts; an ack made at the cloud is queued for
// the edge that raised the alert and no other; a malformed alert and an
// ack of an unknown alert change nothing.
func TestAlertsMergeDeterministic(t *testing.T) {
	id := rules.AlertID("hot", "d1", 10)
	fired := rules.Alert{ID: id, Rule: "hot", Device: "d1", State: rules.StateActive, StartedAt: 10, Stamp: hlc.New(10, 0)}
	edgeAck := fired
	edgeAck.AckedAt, edgeAck.AckedBy, edgeAck.AckStamp = 20, "alice", hlc.New(20, 0)
	cleared := fired
	cleared.ClearedAt, cleared.ClearStamp = 40, hlc.New(40, 0)
	cloudAck := fired
	cloudAck.AckedAt, cloudAck.AckedBy, cloudAck.AckStamp = 30, "ops", hlc.New(30, 0)
	pushCmd := func(a rules.Alert) *Command {
		return &Command{Type: CmdAlerts, AtMs: 1, Alerts: &AlertsCmd{Edge: "e1", Alerts: []rules.Alert{a}}}
	}
	ackCmd := &Command{Type: CmdAlerts, AtMs: 1, Alerts: &AlertsCmd{Alerts: []rules.Alert{cloudAck}, Ack: true}}

	a, b := open(t), open(t)
	for i, c := range []*Command{pushCmd(fired), pushCmd(edgeAck), ackCmd, pushCmd(cleared)} {
		apply(t, a, uint64(i+1), c)
	}
	for i, c := range []*Command{pushCmd(cleared), pushCmd(fired), ackCmd, pushCmd(edgeAck)} {
		apply(t, b, uint64(i+1), c)
	}
	ra, err := a.Alert(id)
	if err != nil {
		t.Fatal(err)
	}
	rb, err := b.Alert(id)
	if err != nil {
		t.Fatal(err)
	}
	if ra != rb || ra.State != rules.StateCleared || ra.AckedBy != "ops" || ra.Edge != "e1" {
		t.Fatalf("replicas differ or wrong merge:\n a %+v\n b %+v", ra, rb)
	}
	page, err := a.Pull("e1", "", 100)
	if err != nil {
		t.Fatal(err)
	}
	var down []rules.Alert
	for _, c := range page.Changes {
		if c.Kind == wire.KindAlert {
			var x rules.Alert
			if err := json.Unmarshal(c.Alert, &x); err != nil {
				t.Fatal(err)
			}
			down = append(down, x)
		}
	}
	if len(down) != 1 || down[0].AckedBy != "ops" {
		t.Fatalf("e1's downlink: %+v", page.Changes)
	}
	if p, err := a.Pull("e2", "", 100); err != nil || len(p.Changes) != 0 {
		t.Fatalf("e2's downlink: %+v %v", p.Changes, err)
	}
	bad := fired
	bad.ID = "d2~hot~10"
	unknown := cloudAck
	unknown.ID, unknown.Device = rules.AlertID("hot", "d3", 10), "d3"
	res := apply(t, a, 10, pushCmd(bad), &Command{Type: CmdAlerts, AtMs: 1, Alerts: &AlertsCmd{Alerts: []rules.Alert{unknown}, Ack: true}})
	if len(res) != 2 || res[0].Applied != 0 || res[1].Applied != 0 {
		t.Fatalf("results %+v", res)
	}
	if all, err := a.Alerts(AlertsQuery{Limit: 10}); err != nil || len(all) != 1 {
		t.Fatalf("alerts %+v %v", all, err)
	}
}
