package service

import (
	"context"
)

// Join adds a voter (on the leader) and records its addresses; repeating a
// join with the same id and addresses succeeds and changes nothing.
// Errors: ErrConflict (the id or raft address is taken), ErrNotLeader.
func (s *Service) Join(ctx context.Context, id, raftAddr, httpAddr string) error {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
	defer cancel()
	if err := s.raft.Join(ctx, id, raftAddr, httpAddr); err != nil {
		return kind(err)
	}
	return nil
}

// Remove removes a member (on the leader). Errors: ErrNoSuchNode,
// ErrNotLeader.
func (s *Service) Remove(ctx context.Context, id string) error {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
	defer cancel()
	if err := s.raft.Remove(ctx, id); err != nil {
		return kind(err)
	}
	return nil
}

// Status is leader, term, indexes and members as this node sees them.
func (s *Service) Status(context.Context) (Status, error) { return s.raft.Status() }

// Snapshot asks raft to take a snapshot now and returns the applied index
// it covers at least.
func (s *Service) Snapshot(context.Context) (uint64, error) {
	if err := s.raft.Snapshot(); err != nil {
		return 0, err
	}
	return s.state.AppliedIndex(), nil
}
