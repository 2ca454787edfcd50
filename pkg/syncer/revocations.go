package syncer

import (
	"encoding/json"
	"fmt"
	"sync"
	"time"

	"github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/wire"
)

const keyRevocations = "session_revocations"

// Revocations is the edge's copy of the sessions the cloud ended (a reused
// refresh token's family, or every session of a user an admin revoked),
// learned through pull and kept in the store so that an edge restarted
// offline still refuses them.
//
// The offline window: an edge knows of a revocation only after its next
// successful pull (every PullInterval while the link is up). An edge that
// cannot reach the cloud keeps accepting a revoked session's tokens — its
// access tokens, and its refresh token for new edge-signed access tokens —
// until it pulls again or the refresh token expires. Nothing can close that
// window without the cloud; it is the price of identity that works offline.
//
// Entries are forgotten once nothing they name can still be valid (the
// cloud stamps that time), so the set stays bounded by the sessions revoked
// within one refresh-token lifetime.
type Revocations struct {
	st  *store.Store
	now func() time.Time

	mu    sync.RWMutex
	state revocationState
}

type revocationState struct {
	Families map[string]int64       `json:"families"` // family → until (Unix ms)
	Users    map[string]userRevoked `json:"users"`
}

// userRevoked: the user's tokens issued before BeforeMs are refused until
// UntilMs.
type userRevoked struct {
	BeforeMs int64 `json:"before_ms"`
	UntilMs  int64 `json:"until_ms"`
}

func loadRevocations(st *store.Store, now func() time.Time) (*Revocations, error) {
	r := &Revocations{st: st, now: now, state: revocationState{Families: map[string]int64{}, Users: map[string]userRevoked{}}}
	v, err := st.SyncValue(keyRevocations)
	if err != nil {
		return nil, err
	}
	if len(v) > 0 {
		var s revocationState
		if err := json.Unmarshal(v, &s); err != nil {
			return nil, fmt.Errorf("cached session revocations: %w", err)
		}
		for f, u := range s.Families {
			r.state.Families[f] = u
		}
		for o, u := range s.Users {
			r.state.Users[o] = u
		}
	}
	return r, nil
}

// Revoked reports whether the session a verified token belongs to was
// revoked, as of the last pull. A nil Revocations revokes nothing.
func (r *Revocations) Revoked(c auth.Claims) bool {
	if r == nil {
		return false
	}
	r.mu.RLock()
	defer r.mu.RUnlock()
	if c.Family != "" {
		if _, ok := r.state.Families[c.Family]; ok {
			return true
		}
	}
	u, ok := r.state.Users[c.OpenID]
	return ok && c.IssuedAt.UnixMilli() < u.BeforeMs
}

// add merges pulled revocations, forgets expired ones and persists the set
// before the pull cursor moves past them (a crash in between re-applies
// them, which changes nothing).
func (r *Revocations) add(list []*wire.Sessions) error {
	if len(list) == 0 {
		return nil
	}
	nowMs := r.now().UnixMilli()
	r.mu.Lock()
	defer r.mu.Unlock()
	next := revocationState{Families: make(map[string]int64, len(r.state.Families)), Users: make(map[string]userRevoked, len(r.state.Users))}
	for f, u := range r.state.Families {
		if u > nowMs {
			next.Families[f] = u
		}
	}
	for o, u := range r.state.Users {
		if u.UntilMs > nowMs {
			next.Users[o] = u
		}
	}
	for _, s := range list {
		if s.UntilMs <= nowMs {
			continue // nothing it names can still be valid
		}
		for _, f := range s.Families {
			next.Families[f] = max(next.Families[f], s.UntilMs)
		}
		if s.OpenID != "" && s.BeforeMs > 0 {
			u := next.Users[s.OpenID]
			next.Users[s.OpenID] = userRevoked{BeforeMs: max(u.BeforeMs, s.BeforeMs), UntilMs: max(u.UntilMs, s.UntilMs)}
		}
	}
	b, err := json.Marshal(next)
	if err != nil {
		return err
	}
	if err := r.st.SetSyncValues(map[string][]byte{keyRevocations: b}); err != nil {
		return fmt.Errorf("store session revocations: %w", err)
	}
	r.state = next
	return nil
}
