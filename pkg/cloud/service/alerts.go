package service

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Alerts the edges' rules raised, across edges.

// PushAlerts merges the alerts edge sent (the latest value of each) into
// the cloud's copies. Every alert is checked first (fsm.CheckAlert): one
// that is malformed refuses the batch with wire.ErrInvalid.
func (s *Service) PushAlerts(ctx context.Context, edge string, b *wire.AlertBatch) (wire.AlertResult, error) {
	if b.Edge == "" {
		b.Edge = edge
	}
	if b.Edge != edge {
		return wire.AlertResult{}, fmt.Errorf("%w: edge %q sent alerts as %q", ErrWrongEdge, edge, b.Edge)
	}
	if len(b.Alerts) > wire.MaxBatchAlerts {
		return wire.AlertResult{}, fmt.Errorf("%w: %d alerts, at most %d in a batch", wire.ErrInvalid, len(b.Alerts), wire.MaxBatchAlerts)
	}
	if len(b.Alerts) == 0 {
		return wire.AlertResult{}, nil
	}
	cmd := &fsm.AlertsCmd{Edge: edge, Alerts: make([]rules.Alert, 0, len(b.Alerts))}
	rejected := 0
	for i, raw := range b.Alerts {
		var a rules.Alert
		if err := json.Unmarshal(raw, &a); err != nil {
			return wire.AlertResult{}, fmt.Errorf("%w: alert %d: %v", wire.ErrInvalid, i, err)
		}
		if err := fsm.CheckAlert(&a); err != nil {
			return wire.AlertResult{}, err
		}
		n, err := s.screenAlert(&a)
		if err != nil {
			return wire.AlertResult{}, err
		}
		rejected += n
		cmd.Alerts = append(cmd.Alerts, a)
	}
	res, err := s.propose(ctx, &fsm.Command{Type: fsm.CmdAlerts, Alerts: cmd})
	if err != nil {
		return wire.AlertResult{}, err
	}
	if res.Err != nil {
		return wire.AlertResult{}, res.Err
	}
	return wire.AlertResult{Applied: res.Applied, RejectedStamps: rejected}, nil
}

// screenAlert applies the stamp policy to an alert's transitions: each
// stamp is folded into the clock (so an ack made at the cloud afterwards
// is stamped after it), and one further ahead than the maximum drift is
// demoted to the oldest stamp: the transition is kept but loses to every
// real one, so one bad clock cannot pin an alert's acker for good.
func (s *Service) screenAlert(a *rules.Alert) (int, error) {
	n := 0
	for _, st := range []*hlc.Timestamp{&a.Stamp, &a.AckStamp, &a.ClearStamp} {
		if st.IsZero() {
			continue
		}
		if _, err := s.clock.Update(*st); err != nil {
			if !errors.Is(err, hlc.ErrDrift) {
				return 0, err
			}
			*st = demoted
			n++
		}
	}
	if n > 0 {
		s.log.Warn("alert stamps beyond the maximum clock drift were demoted", "alert", a.ID, "stamps", n)
	}
	return n, nil
}

// Alerts lists alerts across edges (fsm.AlertsQuery).
func (s *Service) Alerts(_ context.Context, q fsm.AlertsQuery) ([]fsm.AlertRecord, error) {
	return s.state.Alerts(q)
}

// AckAlert acknowledges alert id as by (an openid, or "" for the service),
// stamped by the cloud's clock. The ack is merged like any copy (an alert
// already acknowledged keeps the ack with the later stamp everywhere) and
// queued for the edge that raised the alert, which converges on it with
// its next pull. ErrNotFound if no edge sent the alert.
func (s *Service) AckAlert(ctx context.Context, id, by string) (fsm.AlertRecord, error) {
	cur, err := s.state.Alert(id)
	if errors.Is(err, fsm.ErrNotFound) {
		return fsm.AlertRecord{}, fmt.Errorf("%w: alert %s", ErrNotFound, id)
	}
	if err != nil {
		return fsm.AlertRecord{}, err
	}
	now := s.clock.Now()
	ack := cur.Alert
	ack.AckedAt, ack.AckedBy, ack.AckStamp = s.cfg.Now().UnixMilli(), by, now
	if _, err := s.propose(ctx, &fsm.Command{Type: fsm.CmdAlerts, Alerts: &fsm.AlertsCmd{Alerts: []rules.Alert{ack}, Ack: true}}); err != nil {
		return fsm.AlertRecord{}, err
	}
	return s.state.Alert(id)
}
