package service

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/policy"
	"github.com/outpost-edge/outpost/pkg/shadow"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// The consumer API: thin reads of this replica's state and leader-stamped
// writes. Reads are local; a caller wanting a leader-confirmed read runs
// Barrier on the leader first. Writes take validated input (httpapi checks
// ids, sizes and limits) and return ErrNotLeader on a follower.

// Device is a device's record. Errors: ErrNotFound.
func (s *Service) Device(_ context.Context, id string) (*fsm.Device, error) {
	d, err := s.state.GetDevice(id)
	return d, kind(err)
}

// Readings is one page of a device's readings. Errors: ErrBadCursor.
func (s *Service) Readings(_ context.Context, q fsm.ReadingsQuery) ([]fsm.StoredReading, string, error) {
	items, next, err := s.state.Readings(q)
	if err != nil {
		return nil, "", kind(err)
	}
	if items == nil {
		items = []fsm.StoredReading{}
	}
	return items, next, nil
}

// PutDesired merges state into a device's desired document, stamped on the
// leader, and returns the device after the write.
func (s *Service) PutDesired(ctx context.Context, id string, state map[string]json.RawMessage) (*fsm.Device, error) {
	doc := shadow.Patch(state, s.clock.Now())
	return s.proposeDevice(ctx, &fsm.Command{Type: fsm.CmdDesired,
		Change: &wire.Change{Kind: wire.KindDesired, Device: id, Doc: doc}})
}

// PutMeta replaces a device's meta (its stamp is set here, on the leader)
// and returns the device after the write.
func (s *Service) PutMeta(ctx context.Context, id string, m wire.Meta) (*fsm.Device, error) {
	m.Stamp = s.clock.Now()
	return s.proposeDevice(ctx, &fsm.Command{Type: fsm.CmdMeta,
		Change: &wire.Change{Kind: wire.KindMeta, Device: id, Meta: &m}})
}

func (s *Service) proposeDevice(ctx context.Context, cmd *fsm.Command) (*fsm.Device, error) {
	res, err := s.propose(ctx, cmd)
	if err != nil {
		return nil, err
	}
	if res.Err != nil || res.Device == nil {
		return nil, fmt.Errorf("device write: %v", res.Err)
	}
	return res.Device, nil
}

// Edges is the edge directory: every edge with its health (a heartbeat or
// pull within HeartbeatFresh), backlog and sync lag from the leader's soft
// state (liveness.go). Run on the leader: ErrNotLeader elsewhere.
func (s *Service) Edges(context.Context) ([]wire.Edge, error) {
	if !s.raft.IsLeader() {
		return nil, ErrNotLeader
	}
	s.live.lead(true, s.cfg.Now().UnixMilli())
	edges, err := s.state.Edges()
	if err != nil {
		return nil, err
	}
	now := s.cfg.Now().UnixMilli()
	l := s.live
	l.mu.Lock()
	for i := range edges {
		edges[i] = l.served(edges[i], now, s.cfg.HeartbeatFresh)
	}
	l.mu.Unlock()
	if edges == nil {
		edges = []wire.Edge{}
	}
	return edges, nil
}

// Export streams up to limit records after the since cursor to emit and
// returns the cursor to resume from; an error from emit stops the page
// (the cursor still resumes after what was emitted). Errors: ErrBadCursor,
// ErrCompacted.
func (s *Service) Export(_ context.Context, since string, limit int, emit func(*fsm.ExportRecord) error) (string, error) {
	if _, _, err := fsm.ParseExportCursor(since); err != nil {
		return "", &kindError{kind: ErrBadCursor, err: err}
	}
	next, err := s.state.Export(since, limit, emit)
	return next, kind(err)
}

// User is a user's record. Errors: ErrNotFound.
func (s *Service) User(_ context.Context, openid string) (*wire.User, error) {
	u, err := s.state.GetUser(openid)
	return u, kind(err)
}

// PutUser replaces a user's roles and regions (stamped here, on the leader)
// and returns the record as stored.
func (s *Service) PutUser(ctx context.Context, u wire.User) (wire.User, error) {
	u.Stamp = s.clock.Now()
	if _, err := s.propose(ctx, &fsm.Command{Type: fsm.CmdUserPut, User: &u}); err != nil {
		return wire.User{}, err
	}
	return u, nil
}

// Policies is the Rego modules every edge pulls.
func (s *Service) Policies(context.Context) ([]wire.Policy, error) {
	ps, err := s.state.Policies()
	if err != nil {
		return nil, err
	}
	if ps == nil {
		ps = []wire.Policy{}
	}
	return ps, nil
}

// PutPolicy stores a Rego module; an empty one deletes it. Once the cloud
// distributes any policy, edges use the cloud's set in place of their own.
//
// The set as it would be after the write is compiled first (policy.Check,
// the edges' own compiler): a module that does not compile is refused with
// the compiler's message (matching wire.ErrInvalid) and nothing is
// proposed, since every edge would refuse the whole set and with it every
// later update. Writes are serialised on this node so two modules checked
// alone are not both accepted when they conflict together.
func (s *Service) PutPolicy(ctx context.Context, p wire.Policy) error {
	s.policyMu.Lock()
	defer s.policyMu.Unlock()
	cur, err := s.state.Policies()
	if err != nil {
		return err
	}
	set := make([]policy.Module, 0, len(cur)+1)
	for _, m := range cur {
		if m.Name != p.Name {
			set = append(set, policy.Module{Name: m.Name, Source: m.Rego})
		}
	}
	if p.Rego != "" {
		set = append(set, policy.Module{Name: p.Name, Source: p.Rego})
	}
	if err := policy.Check(ctx, set); err != nil {
		return &kindError{kind: wire.ErrInvalid, err: fmt.Errorf("policy %s refused, nothing was distributed: %w", p.Name, err)}
	}
	_, err = s.propose(ctx, &fsm.Command{Type: fsm.CmdPolicyPut, Policy: &p})
	return err
}
