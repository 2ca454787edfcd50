package fsm

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"

	bolt "go.etcd.io/bbolt"

	"github.com/outpost-edge/outpost/pkg/wire"
)

// Users' sessions. The cloud's refresh tokens are signed JWTs that name
// their session (family) and carry their own id (jti). The state machine
// keeps, per family, the id of the one refresh token that may be used next,
// so every node agrees on it:
//
//   - login creates the family (CmdSessionCreate);
//   - a refresh is a compare-and-set (CmdSessionRotate): if the family's
//     current token is the presented one it becomes the new one; otherwise
//     the presented token was used before — copied — and the family is
//     revoked (reuse detection, as in the standalone edge's local store),
//     unless it is a retry within the reuse grace the leader stamps into
//     the command: the token the last rotation consumed, presented again
//     with the same successor (successor ids derive from the presented
//     token) at most GraceMs after it, while that successor is still
//     current. Then nothing changes and the answer is ErrSessionRetried:
//     the caller hands out the pair that rotation issued again;
//   - an admin ends every session of a user (CmdSessionRevokeUser), which
//     also records a per-user "issued before" watermark;
//   - the leader periodically proposes CmdSessionPurge with a cutoff it
//     stamps, and every replica removes the same expired records, oldest
//     first, a bounded number per command.
//
// Revocations (reuse and per-user) are queued for every edge as KindSessions
// changes, so that an edge refreshing a session offline can refuse them.

// Session errors, in Result.Err.
var (
	// ErrSessionUnknown: no such family (never created, or purged after it
	// expired).
	ErrSessionUnknown = errors.New("session unknown")
	// ErrSessionRevoked: the family was revoked earlier.
	ErrSessionRevoked = errors.New("session revoked")
	// ErrSessionReused: the presented token was already rotated; the family
	// is revoked now.
	ErrSessionReused = errors.New("refresh token reused; session revoked")
	// ErrSessionRetried: the presented token's rotation is being retried
	// within the reuse grace; the session is unchanged, and its current
	// token is the successor that rotation issued at RotatedMs.
	ErrSessionRetried = errors.New("refresh retried within the reuse grace")
)

// SessionCmd is the payload of the session commands. Times are the
// leader's, stamped into the command, so Apply stays deterministic.
type SessionCmd struct {
	Family string `json:"family,omitempty"`
	OpenID string `json:"openid,omitempty"`
	// From is the presented token's id (rotate); To the new current one
	// (create, rotate), which expires at ExpMs.
	From  string `json:"from,omitempty"`
	To    string `json:"to,omitempty"`
	ExpMs int64  `json:"exp_ms,omitempty"`
	// Revoke user: tokens issued before BeforeMs are refused; the watermark
	// is kept until UntilMs (when no token issued before it can be alive).
	BeforeMs int64 `json:"before_ms,omitempty"`
	UntilMs  int64 `json:"until_ms,omitempty"`
	// Rotate: when the leader rotates (the successor's issue time), and
	// the reuse grace (0: none). Both optional: an older leader's command
	// has neither, and its reuses revoke.
	NowMs   int64 `json:"now_ms,omitempty"`
	GraceMs int64 `json:"grace_ms,omitempty"`
	// Purge: remove records that expired at or before CutoffMs, at most
	// Limit of them.
	CutoffMs int64 `json:"cutoff_ms,omitempty"`
	Limit    int   `json:"limit,omitempty"`
}

// SessionState is a family as the state machine keeps it.
type SessionState struct {
	OpenID  string `json:"openid"`
	Current string `json:"current"` // id of the refresh token that may be used next
	Revoked bool   `json:"revoked,omitempty"`
	ExpMs   int64  `json:"exp_ms"`
	// The last rotation: the token it consumed and when (NowMs).
	Prev      string `json:"prev,omitempty"`
	RotatedMs int64  `json:"rotated_ms,omitempty"`
}

// watermark is a user's "sessions revoked before" record.
type watermark struct {
	BeforeMs int64 `json:"before_ms"`
	UntilMs  int64 `json:"until_ms"`
}

// Kinds of expiry index entries.
const (
	expFamily    byte = 'f'
	expWatermark byte = 'u'
)

// maxPurge bounds one purge command, however large a limit it names.
const maxPurge = 10000

func expKey(ms int64, kind byte, id string) []byte {
	k := binary.BigEndian.AppendUint64(make([]byte, 0, 9+len(id)), uint64(max(ms, 0)))
	return append(append(k, kind), id...)
}

func (a *applier) getSession(family string) (*SessionState, error) {
	v := a.bk.sessions.Get([]byte(family))
	if v == nil {
		return nil, nil
	}
	var s SessionState
	if err := json.Unmarshal(v, &s); err != nil {
		return nil, fmt.Errorf("decode session %s: %w", family, err)
	}
	return &s, nil
}

func (a *applier) sessionCreate(c *SessionCmd) (Result, error) {
	if c == nil || c.Family == "" || c.OpenID == "" || c.To == "" {
		return Result{Err: fmt.Errorf("%w: incomplete session", ErrCorrupt)}, nil
	}
	if cur, err := a.getSession(c.Family); err != nil || cur != nil {
		return Result{}, err // the same create again (a retried proposal)
	}
	s := SessionState{OpenID: c.OpenID, Current: c.To, ExpMs: c.ExpMs}
	if err := putJSON(a.bk.sessions, c.Family, s); err != nil {
		return Result{}, err
	}
	if err := a.bk.sessUser.Put(append(append([]byte(c.OpenID), 0), c.Family...), nil); err != nil {
		return Result{}, err
	}
	return Result{Applied: 1}, a.bk.sessExp.Put(expKey(c.ExpMs, expFamily, c.Family), nil)
}

func (a *applier) sessionRotate(c *SessionCmd) (Result, error) {
	if c == nil || c.Family == "" || c.From == "" || c.To == "" {
		return Result{Err: fmt.Errorf("%w: incomplete rotation", ErrCorrupt)}, nil
	}
	s, err := a.getSession(c.Family)
	switch {
	case err != nil:
		return Result{}, err
	case s == nil || (c.OpenID != "" && s.OpenID != c.OpenID):
		return Result{Err: ErrSessionUnknown}, nil
	case s.Revoked:
		return Result{Err: ErrSessionRevoked}, nil
	case s.Current != c.From && c.GraceMs > 0 && s.Prev == c.From && s.Current == c.To &&
		c.NowMs >= s.RotatedMs && c.NowMs-s.RotatedMs <= c.GraceMs:
		return Result{Err: ErrSessionRetried}, nil
	case s.Current != c.From:
		// The presented token was rotated before: someone holds a copy.
		// Revoke the family, which ends the legitimate holder's session
		// too — the only safe answer when it is unknown which is which.
		s.Revoked = true
		if err := putJSON(a.bk.sessions, c.Family, s); err != nil {
			return Result{}, err
		}
		err := a.downlink("*", "", wire.Change{Kind: wire.KindSessions,
			Sessions: &wire.Sessions{OpenID: s.OpenID, Families: []string{c.Family}, UntilMs: s.ExpMs}})
		return Result{Err: ErrSessionReused, Applied: 1}, err
	}
	if err := a.bk.sessExp.Delete(expKey(s.ExpMs, expFamily, c.Family)); err != nil {
		return Result{}, err
	}
	s.Current, s.ExpMs, s.Prev, s.RotatedMs = c.To, c.ExpMs, c.From, c.NowMs
	if err := putJSON(a.bk.sessions, c.Family, s); err != nil {
		return Result{}, err
	}
	return Result{Applied: 1}, a.bk.sessExp.Put(expKey(s.ExpMs, expFamily, c.Family), nil)
}

// sessionRevokeUser revokes every family of a user (found through the
// per-user index, not a scan), raises the user's watermark and queues the
// revocation for every edge.
func (a *applier) sessionRevokeUser(c *SessionCmd) (Result, error) {
	if c == nil || c.OpenID == "" {
		return Result{Err: fmt.Errorf("%w: revocation without a user", ErrCorrupt)}, nil
	}
	prefix := append([]byte(c.OpenID), 0)
	var fams []string
	until := c.UntilMs
	cur := a.bk.sessUser.Cursor()
	for k, _ := cur.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, _ = cur.Next() {
		fam := string(k[len(prefix):])
		s, err := a.getSession(fam)
		if err != nil {
			return Result{}, err
		}
		if s == nil || s.Revoked {
			continue
		}
		s.Revoked = true
		if err := putJSON(a.bk.sessions, fam, s); err != nil {
			return Result{}, err
		}
		fams = append(fams, fam)
		until = max(until, s.ExpMs)
	}
	w := watermark{BeforeMs: c.BeforeMs, UntilMs: c.UntilMs}
	if v := a.bk.revoked.Get([]byte(c.OpenID)); v != nil {
		var old watermark
		if err := json.Unmarshal(v, &old); err != nil {
			return Result{}, fmt.Errorf("decode watermark %s: %w", c.OpenID, err)
		}
		if err := a.bk.sessExp.Delete(expKey(old.UntilMs, expWatermark, c.OpenID)); err != nil {
			return Result{}, err
		}
		w.BeforeMs, w.UntilMs = max(w.BeforeMs, old.BeforeMs), max(w.UntilMs, old.UntilMs)
	}
	if err := putJSON(a.bk.revoked, c.OpenID, w); err != nil {
		return Result{}, err
	}
	if err := a.bk.sessExp.Put(expKey(w.UntilMs, expWatermark, c.OpenID), nil); err != nil {
		return Result{}, err
	}
	err := a.downlink("*", "", wire.Change{Kind: wire.KindSessions,
		Sessions: &wire.Sessions{OpenID: c.OpenID, Families: fams, BeforeMs: w.BeforeMs, UntilMs: max(until, w.UntilMs)}})
	return Result{Applied: len(fams)}, err
}

// sessionPurge removes families and watermarks that expired at or before
// the cutoff, walking the expiry index from its oldest end: the cost is
// proportional to what is removed, and every replica removes the same
// records.
func (a *applier) sessionPurge(c *SessionCmd) (Result, error) {
	if c == nil {
		return Result{}, nil
	}
	limit := c.Limit
	if limit <= 0 || limit > maxPurge {
		limit = maxPurge
	}
	n := 0
	cur := a.bk.sessExp.Cursor()
	for k, _ := cur.First(); k != nil && n < limit; k, _ = cur.First() {
		if len(k) < 9 || int64(binary.BigEndian.Uint64(k[:8])) > c.CutoffMs {
			break
		}
		kind, id := k[8], string(k[9:])
		if err := a.bk.sessExp.Delete(k); err != nil {
			return Result{}, err
		}
		switch kind {
		case expFamily:
			s, err := a.getSession(id)
			if err != nil {
				return Result{}, err
			}
			if s != nil {
				if err := a.bk.sessUser.Delete(append(append([]byte(s.OpenID), 0), id...)); err != nil {
					return Result{}, err
				}
			}
			if err := a.bk.sessions.Delete([]byte(id)); err != nil {
				return Result{}, err
			}
		case expWatermark:
			if err := a.bk.revoked.Delete([]byte(id)); err != nil {
				return Result{}, err
			}
		}
		n++
	}
	return Result{Applied: n}, nil
}

// Session returns a family's state, or ErrNotFound.
func (f *FSM) Session(family string) (SessionState, error) {
	var s SessionState
	err := f.view(func(tx *bolt.Tx) error {
		v := tx.Bucket(bktSessions).Get([]byte(family))
		if v == nil {
			return fmt.Errorf("session: %w", ErrNotFound)
		}
		return json.Unmarshal(v, &s)
	})
	return s, err
}

// SessionsRevokedBefore is the user's revocation watermark (Unix ms): the
// user's tokens issued before it are refused. 0 when none.
func (f *FSM) SessionsRevokedBefore(openid string) int64 {
	var w watermark
	_ = f.view(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bktRevoked).Get([]byte(openid)); v != nil {
			return json.Unmarshal(v, &w)
		}
		return nil
	})
	return w.BeforeMs
}

// SessionCounts reports how many families and watermarks are stored (for
// tests and diagnostics).
func (f *FSM) SessionCounts() (families, watermarks int) {
	_ = f.view(func(tx *bolt.Tx) error {
		families = tx.Bucket(bktSessions).Stats().KeyN
		watermarks = tx.Bucket(bktRevoked).Stats().KeyN
		return nil
	})
	return families, watermarks
}
