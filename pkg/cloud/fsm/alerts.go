package fsm

import (
	"bytes"
	"encoding/json"
	"fmt"

	bolt "go.etcd.io/bbolt"

	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Alerts raised by edges' rules, across edges. Every copy that arrives (an
// edge's push, an ack at the cloud) is folded into the stored alert with
// rules.Alert.Merge, which is deterministic and order-insensitive, so the
// replicas agree and a re-sent or reordered copy changes nothing.
//
// bucket alerts: alert id (device~rule~ms) → JSON AlertRecord.

// CmdAlerts merges alerts into the alerts bucket.
const CmdAlerts CmdType = 19

var bktAlerts = []byte("alerts")

// AlertsCmd is CmdAlerts' payload: alerts Edge pushed, or (Edge "", Ack)
// an ack made at the cloud, which is also queued as a KindAlert downlink
// entry for the edge that raised the alert, so it converges there.
type AlertsCmd struct {
	Edge   string        `json:"edge,omitempty"`
	Alerts []rules.Alert `json:"alerts"`
	Ack    bool          `json:"ack,omitempty"`
}

// AlertRecord is a stored alert and the edge that raised it.
type AlertRecord struct {
	rules.Alert
	Edge string `json:"edge"`
}

// maxAlertsPerCmd bounds one CmdAlerts.
const maxAlertsPerCmd = wire.MaxBatchAlerts

func (a *applier) alerts(c *AlertsCmd) (Result, error) {
	if c == nil || len(c.Alerts) > maxAlertsPerCmd {
		return Result{Err: fmt.Errorf("%w: alerts command without alerts", ErrCorrupt)}, nil
	}
	b, err := a.tx.CreateBucketIfNotExists(bktAlerts)
	if err != nil {
		return Result{}, err
	}
	n := 0
	for _, in := range c.Alerts {
		if CheckAlert(&in) != nil {
			continue // the service checked; an entry from a bad leader changes nothing
		}
		var rec AlertRecord
		if v := b.Get([]byte(in.ID)); v != nil {
			if err := json.Unmarshal(v, &rec); err != nil {
				return Result{}, fmt.Errorf("alert %s: %w", in.ID, err)
			}
			if !rec.Merge(in) {
				continue
			}
		} else {
			if c.Ack {
				continue // an ack of an alert no edge sent
			}
			rec = AlertRecord{Alert: in, Edge: c.Edge}
			rec.Merge(in) // derives the state from the stamps, as every later merge will
			if err := a.enqueueNotify(&rec); err != nil {
				return Result{}, err
			}
		}
		if err := putJSON(b, in.ID, rec); err != nil {
			return Result{}, err
		}
		n++
		if c.Ack && rec.Edge != "" {
			raw, err := json.Marshal(rec.Alert)
			if err != nil {
				return Result{}, err
			}
			if err := a.downlink(rec.Edge, "", wire.Change{Kind: wire.KindAlert, Device: rec.Device, Alert: raw}); err != nil {
				return Result{}, err
			}
		}
	}
	return Result{Applied: n}, nil
}

// CheckAlert checks an alert from an edge: its id names its device, rule
// and start, and its state and sizes are what an edge's rules produce.
func CheckAlert(al *rules.Alert) error {
	dev, rule, ms, ok := rules.ParseAlertID(al.ID)
	switch {
	case !ok || dev != al.Device || rule != al.Rule || ms != al.StartedAt:
		return fmt.Errorf("%w: alert id %q does not name its device, rule and start", wire.ErrInvalid, al.ID)
	case !wire.ValidName(dev) || !wire.ValidName(rule):
		return fmt.Errorf("%w: alert %q: device and rule must match [A-Za-z0-9._-]{1,64}", wire.ErrInvalid, al.ID)
	case al.State != rules.StateActive && al.State != rules.StateAcknowledged && al.State != rules.StateCleared:
		return fmt.Errorf("%w: alert %q: unknown state %q", wire.ErrInvalid, al.ID, al.State)
	case len(al.Message) > 1024 || len(al.AckedBy) > 128 || len(al.Severity) > 32:
		return fmt.Errorf("%w: alert %q: message, acked_by or severity too long", wire.ErrInvalid, al.ID)
	}
	return nil
}

// AlertsQuery selects alerts: of one device, one edge, in one state (each
// optional), after a cursor (the last id of the previous page).
type AlertsQuery struct {
	Device, Edge, State string
	After               string
	Limit               int
}

// Alerts lists alerts in id order (device, rule, start). A device's alerts
// are one key range; the edge and state filters are applied while walking
// it, so a query filtering only by those reads the alerts up to the page's
// end.
func (f *FSM) Alerts(q AlertsQuery) ([]AlertRecord, error) {
	out := []AlertRecord{}
	err := f.view(func(tx *bolt.Tx) error {
		b := tx.Bucket(bktAlerts)
		if b == nil {
			return nil
		}
		var prefix []byte
		if q.Device != "" {
			prefix = []byte(q.Device + "~")
		}
		seek := prefix
		if q.After != "" && q.After > string(prefix) {
			seek = []byte(q.After)
		}
		c := b.Cursor()
		for k, v := c.Seek(seek); k != nil && bytes.HasPrefix(k, prefix) && len(out) < q.Limit; k, v = c.Next() {
			if q.After != "" && string(k) <= q.After {
				continue
			}
			var r AlertRecord
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("%w: alert %s: %v", ErrCorrupt, k, err)
			}
			if (q.Edge != "" && r.Edge != q.Edge) || (q.State != "" && r.State != q.State) {
				continue
			}
			out = append(out, r)
		}
		return nil
	})
	return out, err
}

// Alert returns one alert; ErrNotFound if no edge sent it.
func (f *FSM) Alert(id string) (AlertRecord, error) {
	var r AlertRecord
	err := f.view(func(tx *bolt.Tx) error {
		b := tx.Bucket(bktAlerts)
		var v []byte
		if b != nil {
			v = b.Get([]byte(id))
		}
		if v == nil {
			return fmt.Errorf("alert %q: %w", id, ErrNotFound)
		}
		return json.Unmarshal(v, &r)
	})
	return r, err
}
