package fsm

import (
	"errors"
	"testing"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/shadow"
	"github.com/outpost-edge/outpost/pkg/wire"
)

func sess(t CmdType, c SessionCmd) *Command {
	return &Command{Type: t, AtMs: 1, Session: &c}
}

// TestSessionCommands walks one state machine through a session's life:
// create, rotate, reuse (which revokes), revoke-user and purge, checking
// each command's outcome and the revocations queued for edges.
func TestSessionCommands(t *testing.T) {
	f := open(t)
	steps := []struct {
		name        string
		cmd         *Command
		wantErr     error
		wantApplied int
	}{
		{"create f1", sess(CmdSessionCreate, SessionCmd{Family: "f1", OpenID: "o1", To: "j1", ExpMs: 100}), nil, 1},
		{"create is idempotent", sess(CmdSessionCreate, SessionCmd{Family: "f1", OpenID: "o1", To: "jX", ExpMs: 100}), nil, 0},
		{"rotate j1 to j2", sess(CmdSessionRotate, SessionCmd{Family: "f1", OpenID: "o1", From: "j1", To: "j2", ExpMs: 200}), nil, 1},
		{"rotate j2 to j3", sess(CmdSessionRotate, SessionCmd{Family: "f1", OpenID: "o1", From: "j2", To: "j3", ExpMs: 300}), nil, 1},
		{"reuse of j1 revokes", sess(CmdSessionRotate, SessionCmd{Family: "f1", OpenID: "o1", From: "j1", To: "j4", ExpMs: 400}), ErrSessionReused, 1},
		{"the newest token is refused too", sess(CmdSessionRotate, SessionCmd{Family: "f1", OpenID: "o1", From: "j3", To: "j5", ExpMs: 500}), ErrSessionRevoked, 0},
		{"unknown family", sess(CmdSessionRotate, SessionCmd{Family: "nope", From: "a", To: "b", ExpMs: 1}), ErrSessionUnknown, 0},
		{"another user's family", sess(CmdSessionRotate, SessionCmd{Family: "f1", OpenID: "o2", From: "j3", To: "j6", ExpMs: 1}), ErrSessionUnknown, 0},
		{"create f2 for o1", sess(CmdSessionCreate, SessionCmd{Family: "f2", OpenID: "o1", To: "k1", ExpMs: 150}), nil, 1},
		{"create f3 for o1", sess(CmdSessionCreate, SessionCmd{Family: "f3", OpenID: "o1", To: "m1", ExpMs: 900}), nil, 1},
		{"create g1 for o2", sess(CmdSessionCreate, SessionCmd{Family: "g1", OpenID: "o2", To: "n1", ExpMs: 120}), nil, 1},
		{"revoke o1's live sessions", sess(CmdSessionRevokeUser, SessionCmd{OpenID: "o1", BeforeMs: 50, UntilMs: 250}), nil, 2},
		{"f2 refused after revoke", sess(CmdSessionRotate, SessionCmd{Family: "f2", OpenID: "o1", From: "k1", To: "k2", ExpMs: 160}), ErrSessionRevoked, 0},
		{"o2 unaffected", sess(CmdSessionRotate, SessionCmd{Family: "g1", OpenID: "o2", From: "n1", To: "n2", ExpMs: 130}), nil, 1},
		{"malformed rotation", sess(CmdSessionRotate, SessionCmd{Family: "g1"}), ErrCorrupt, 0},
	}
	for i, st := range steps {
		res := apply(t, f, uint64(i+1), st.cmd)[0]
		if !errors.Is(res.Err, st.wantErr) || (st.wantErr == nil && res.Err != nil) || res.Applied != st.wantApplied {
			t.Fatalf("%s: got err %v applied %d, want %v %d", st.name, res.Err, res.Applied, st.wantErr, st.wantApplied)
		}
	}
	if s, err := f.Session("g1"); err != nil || s.Current != "n2" || s.Revoked {
		t.Fatalf("g1 %+v %v", s, err)
	}
	if got := f.SessionsRevokedBefore("o1"); got != 50 {
		t.Fatalf("o1 watermark %d, want 50", got)
	}

	// Edges learn both revocations: the reused family, and o1's live ones
	// with the watermark.
	page, err := f.Pull("e1", "", 100)
	if err != nil {
		t.Fatal(err)
	}
	var revs []*wire.Sessions
	for _, c := range page.Changes {
		if c.Kind == wire.KindSessions {
			revs = append(revs, c.Sessions)
		}
	}
	if len(revs) != 2 || revs[0].Families[0] != "f1" || revs[0].UntilMs != 300 ||
		revs[1].OpenID != "o1" || len(revs[1].Families) != 2 || revs[1].BeforeMs != 50 || revs[1].UntilMs != 900 {
		t.Fatalf("revocations queued for edges: %+v", revs)
	}

	// Purge by expiry order, bounded per command: g1 (130), f2 (150),
	// the o1 watermark (250), f1 (300) expire by 300; f3 (900) stays.
	idx := uint64(len(steps))
	tests := []struct {
		cutoff, limit           int64
		wantApplied             int
		wantFamilies, wantMarks int
	}{
		{cutoff: 100, limit: 10, wantApplied: 0, wantFamilies: 4, wantMarks: 1},
		{cutoff: 300, limit: 2, wantApplied: 2, wantFamilies: 2, wantMarks: 1},
		{cutoff: 300, limit: 10, wantApplied: 2, wantFamilies: 1, wantMarks: 0},
		{cutoff: 300, limit: 10, wantApplied: 0, wantFamilies: 1, wantMarks: 0},
	}
	for _, tc := range tests {
		idx++
		res := apply(t, f, idx, sess(CmdSessionPurge, SessionCmd{CutoffMs: tc.cutoff, Limit: int(tc.limit)}))[0]
		fams, marks := f.SessionCounts()
		if res.Applied != tc.wantApplied || fams != tc.wantFamilies || marks != tc.wantMarks {
			t.Fatalf("purge %d/%d: applied %d, %d families %d watermarks; want %d %d %d",
				tc.cutoff, tc.limit, res.Applied, fams, marks, tc.wantApplied, tc.wantFamilies, tc.wantMarks)
		}
	}
	if _, err := f.Session("f3"); err != nil {
		t.Fatalf("f3 purged early: %v", err)
	}
	if f.SessionsRevokedBefore("o1") != 0 {
		t.Fatal("o1 watermark survived its expiry")
	}
	// The user index went with the families: revoking o1 again finds only
	// the live f4 (f3 was revoked already).
	apply(t, f, idx+1, sess(CmdSessionCreate, SessionCmd{Family: "f4", OpenID: "o1", To: "p1", ExpMs: 1000}))
	if res := apply(t, f, idx+2, sess(CmdSessionRevokeUser, SessionCmd{OpenID: "o1", BeforeMs: 60, UntilMs: 70}))[0]; res.Applied != 1 {
		t.Fatalf("second revoke applied %d, want 1 (f4)", res.Applied)
	}
}

// TestConflictsCounted: the merge counts writes that lost to a newer stored
// one, never a re-application of the same write.
func TestConflictsCounted(t *testing.T) {
	var conflicts int
	f := open(t)
	f.hooks.OnConflicts = func(n int) { conflicts += n }
	st := func(ms int64) hlc.Timestamp { return hlc.New(ms, 0) }
	desired := func(edge string, seq uint64, v string, at int64) *Command {
		return &Command{Type: CmdPush, AtMs: 1, Push: &wire.PushBatch{Edge: edge, FirstSeq: seq, Changes: []wire.Change{
			{Kind: wire.KindDesired, Device: "d1", Doc: shadow.Doc{"mode": {Value: []byte(v), Stamp: st(at)}}}}}}
	}
	user := func(edge string, seq uint64, role string, at int64) *Command {
		return &Command{Type: CmdPush, AtMs: 1, Push: &wire.PushBatch{Edge: edge, FirstSeq: seq, Changes: []wire.Change{
			{Kind: wire.KindUser, User: &wire.User{OpenID: "o1", Roles: []string{role}, Stamp: st(at)}}}}}
	}
	tests := []struct {
		name string
		cmd  *Command
		want int
	}{
		{"first write", desired("e1", 1, `"eco"`, 20), 0},
		{"newer write wins", desired("e2", 1, `"boost"`, 30), 0},
		{"older write loses", desired("e1", 2, `"off"`, 25), 1},
		{"same write again via state", &Command{Type: CmdState, AtMs: 1, State: &wire.StateBatch{Edge: "e2", Changes: []wire.Change{
			{Kind: wire.KindDesired, Device: "d1", Doc: shadow.Doc{"mode": {Value: []byte(`"boost"`), Stamp: st(30)}}}}}}, 1},
		{"user", user("e1", 3, "viewer", 40), 1},
		{"older user loses", user("e2", 2, "admin", 35), 2},
	}
	for i, tc := range tests {
		apply(t, f, uint64(i+1), tc.cmd)
		if conflicts != tc.want {
			t.Fatalf("%s: %d conflicts, want %d", tc.name, conflicts, tc.want)
		}
	}
}

// TestSessionRotateGrace: a rotation presented again with the same
// successor within the grace stamped into the command is a retry
// (ErrSessionRetried, nothing changes); outside it, with another successor,
// of an older token, or from a command without a grace (an older leader's),
// it is a reuse that revokes.
func TestSessionRotateGrace(t *testing.T) {
	rot := func(from, to string, now, grace int64) *Command {
		return sess(CmdSessionRotate, SessionCmd{Family: "f", OpenID: "o", From: from, To: to, ExpMs: 1e6, NowMs: now, GraceMs: grace})
	}
	cases := []struct {
		name  string
		retry *Command
		want  error
	}{
		{"same successor within the grace", rot("j1", "j2", 1500, 1000), ErrSessionRetried},
		{"at the end of the grace", rot("j1", "j2", 2000, 1000), ErrSessionRetried},
		{"after the grace", rot("j1", "j2", 2001, 1000), ErrSessionReused},
		{"another successor", rot("j1", "jX", 1500, 1000), ErrSessionReused},
		{"no grace in the command", rot("j1", "j2", 1500, 0), ErrSessionReused},
		{"clock behind the rotation", rot("j1", "j2", 999, 1000), ErrSessionReused},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := open(t)
			for i, c := range []*Command{
				sess(CmdSessionCreate, SessionCmd{Family: "f", OpenID: "o", To: "j1", ExpMs: 1e6}),
				rot("j1", "j2", 1000, 1000),
			} {
				if res := apply(t, f, uint64(i+1), c)[0]; res.Err != nil {
					t.Fatal(res.Err)
				}
			}
			res := apply(t, f, 3, tc.retry)[0]
			if !errors.Is(res.Err, tc.want) {
				t.Fatalf("retry: %v, want %v", res.Err, tc.want)
			}
			s, err := f.Session("f")
			if err != nil {
				t.Fatal(err)
			}
			if s.Revoked != (tc.want == ErrSessionReused) || s.Current != "j2" || s.Prev != "j1" || s.RotatedMs != 1000 {
				t.Fatalf("session after the retry: %+v", s)
			}
		})
	}
}
