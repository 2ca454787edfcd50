package fsm

import (
	"encoding/json"
	"fmt"
	"slices"

	bolt "go.etcd.io/bbolt"

	"github.com/outpost-edge/outpost/pkg/rules"
)

// Notifications: the queue of WeChat subscribe messages the cloud owes the
// owners of a device whose alert came from a distributed rule with a notify
// action. The queue is replicated, so exactly one message per owner and
// alert is sent whatever the leader: an alert's first arrival (CmdAlerts)
// enqueues it with the device's owners as the cloud knows them then, the
// leader's notifier sends to each owner and records it (CmdNotifyDone), and
// the entry is deleted once every owner has had theirs. A leader that dies
// between a send and its record makes its successor send that one again:
// the one duplicate an external API without idempotency keys allows.
//
// bucket notify: alert id → JSON Notification.

// CmdNotifyDone records that one owner of a queued notification was sent
// it (or that WeChat refused it for good).
const CmdNotifyDone CmdType = 20

var bktNotify = []byte("notify")

// Notification is a queued notification.
type Notification struct {
	Alert  rules.Alert `json:"alert"`
	Edge   string      `json:"edge"`
	Owners []string    `json:"owners"`
	Sent   []string    `json:"sent,omitempty"`
	AtMs   int64       `json:"at_ms"`
}

// Pending is the owners not sent to yet.
func (n *Notification) Pending() []string {
	var out []string
	for _, o := range n.Owners {
		if !slices.Contains(n.Sent, o) {
			out = append(out, o)
		}
	}
	return out
}

// NotifyDoneCmd is CmdNotifyDone's payload.
type NotifyDoneCmd struct {
	ID    string `json:"id"`
	Owner string `json:"owner"`
}

// enqueueNotify queues the notification of a newly arrived alert when its
// rule is one the cloud distributes with a notify action and its device
// has owners. It reads only replicated state, so every replica decides
// the same.
func (a *applier) enqueueNotify(rec *AlertRecord) error {
	rb := a.tx.Bucket(bktRules)
	if rb == nil {
		return nil
	}
	v := rb.Get([]byte(rec.Rule))
	if v == nil {
		return nil
	}
	var rr RuleRecord
	var r rules.Rule
	if json.Unmarshal(v, &rr) != nil || json.Unmarshal(rr.Rule, &r) != nil {
		return nil
	}
	if !slices.ContainsFunc(r.Actions, func(x rules.Action) bool { return x.Notify }) {
		return nil
	}
	if rr.Region != "" {
		// Only the edges of the rule's region run it; an alert of that
		// name from elsewhere is an edge-local rule's.
		var er edgeRecord
		if v := a.bk.edges.Get([]byte(rec.Edge)); v == nil || json.Unmarshal(v, &er) != nil || er.Region != rr.Region {
			return nil
		}
	}
	owners, err := a.owners(rec.Device)
	if err != nil || len(owners) == 0 {
		return err
	}
	b, err := a.tx.CreateBucketIfNotExists(bktNotify)
	if err != nil {
		return err
	}
	if b.Get([]byte(rec.ID)) != nil {
		return nil
	}
	return putJSON(b, rec.ID, Notification{Alert: rec.Alert, Edge: rec.Edge, Owners: owners, AtMs: a.atMs})
}

// owners is a device's owners as the cloud holds them (none for a device
// it has no record of).
func (a *applier) owners(id string) ([]string, error) {
	if d, ok := a.devices[id]; ok {
		return slices.Clone(d.Owners), nil
	}
	v := a.bk.devices.Get([]byte(id))
	if v == nil {
		return nil, nil
	}
	var d Device
	if err := json.Unmarshal(v, &d); err != nil {
		return nil, fmt.Errorf("decode device %s: %w", id, err)
	}
	return d.Owners, nil
}

func (a *applier) notifyDone(c *NotifyDoneCmd) (Result, error) {
	if c == nil || c.ID == "" {
		return Result{Err: fmt.Errorf("%w: notify-done command without an id", ErrCorrupt)}, nil
	}
	b := a.tx.Bucket(bktNotify)
	if b == nil {
		return Result{}, nil
	}
	v := b.Get([]byte(c.ID))
	if v == nil {
		return Result{}, nil
	}
	var n Notification
	if err := json.Unmarshal(v, &n); err != nil {
		return Result{}, fmt.Errorf("notification %s: %w", c.ID, err)
	}
	if !slices.Contains(n.Owners, c.Owner) || slices.Contains(n.Sent, c.Owner) {
		return Result{}, nil
	}
	n.Sent = append(n.Sent, c.Owner)
	if len(n.Pending()) == 0 {
		return Result{Applied: 1}, b.Delete([]byte(c.ID))
	}
	return Result{Applied: 1}, putJSON(b, c.ID, n)
}

// Notifications returns up to limit queued notifications, by alert id.
func (f *FSM) Notifications(limit int) ([]Notification, error) {
	var out []Notification
	err := f.view(func(tx *bolt.Tx) error {
		b := tx.Bucket(bktNotify)
		if b == nil {
			return nil
		}
		c := b.Cursor()
		for k, v := c.First(); k != nil && len(out) < limit; k, v = c.Next() {
			var n Notification
			if err := json.Unmarshal(v, &n); err != nil {
				return fmt.Errorf("%w: notification %s: %v", ErrCorrupt, k, err)
			}
			out = append(out, n)
		}
		return nil
	})
	return out, err
}
