package service

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	uauth "github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/policy"
	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/shadow"
	"github.com/outpost-edge/outpost/pkg/wire"
	"github.com/outpost-edge/outpost/policies"
)

// Edge restriction (docs/security.md, "Edge restriction"): the cloud holds
// an edge to what an edge may do, as Kubernetes' NodeRestriction holds a
// kubelet. Readings and reported state are the edge's own observations and
// always accepted (reported state that wins re-homes the device to the
// edge). Desired state and meta are accepted only with proof of the user
// who made the change — the access token the user presented at the edge,
// signed by the deployment key and valid at the change's HLC time, not
// older than MaxOffline, of a session not revoked — and only if the cloud's
// own policy allows that user the action on the device as the cloud sees
// it. User changes from edges are always refused: roles are granted at the
// cloud. A refused change keeps its sequence number, is counted by edge and
// reason, and becomes a correction that returns the edge's copy to the
// cloud's value.
//
// The check runs here, before proposing, on the node that received the
// batch (the leader): it reads the wall clock, the key set and the policy
// engine, which the state machine's Apply must not. The refusals travel in
// the command, so every replica applies the same corrections.

// Reasons a change is refused: the reason label of
// outpost_cloud_changes_refused_total and the keys of a push's
// refused_reasons.
const (
	RefuseUserChange     = "user_change"
	RefuseNoProof        = "no_proof"
	RefuseUntrustedKey   = "proof_untrusted_key"
	RefuseExpired        = "proof_expired"
	RefuseInvalid        = "proof_invalid"
	RefuseTooOld         = "proof_too_old"
	RefuseActorMismatch  = "actor_mismatch"
	RefuseSessionRevoked = "session_revoked"
	RefuseDenied         = "denied"
	// A set_desired whose actor is a rule ("rule:<name>") that the cloud
	// does not distribute to the edge, or that does not write those fields
	// with those values for a device the rule selects.
	RefuseRuleNotDistributed = "rule_not_distributed"
	RefuseRuleMismatch       = "rule_action_mismatch"
)

// RuleActorPrefix marks a change a rule made at an edge: its actor is
// "rule:" + the rule's name (alerting.ActorPrefix).
const RuleActorPrefix = "rule:"

// ProofVerifier checks a change's proof: an access token, as of the time
// the change was made. *auth.Issuer satisfies it.
type ProofVerifier interface {
	VerifyAt(token string, at time.Time) (uauth.Claims, error)
}

// Authorizer decides a user's action with the deployment's policy
// (data.outpost.authz); *policy.Set satisfies it.
type Authorizer interface {
	Decide(ctx context.Context, in policy.Input) (policy.Decision, error)
}

// Policy actions the cloud re-authorises.
const (
	actWriteDesired = "device.write_desired"
	actWriteMeta    = "device.write_meta"
)

// policyCache compiles the policies the cloud distributes (the built-in
// ones while it distributes none), once per version of the set.
type policyCache struct {
	mu     sync.Mutex
	digest string
	set    *policy.Set
}

// authorizer is the policy edges enforce now: the cloud's distributed set,
// or the built-in one.
func (s *Service) authorizer(ctx context.Context) (Authorizer, error) {
	ps, err := s.state.Policies()
	if err != nil {
		return nil, err
	}
	var mods []policy.Module
	if len(ps) == 0 {
		src, err := policies.Builtin()
		if err != nil {
			return nil, err
		}
		for name, rego := range src {
			mods = append(mods, policy.Module{Name: name, Source: rego})
		}
	} else {
		for _, p := range ps {
			mods = append(mods, policy.Module{Name: p.Name, Source: p.Rego})
		}
	}
	sort.Slice(mods, func(i, j int) bool { return mods[i].Name < mods[j].Name })
	var b strings.Builder
	for _, m := range mods {
		fmt.Fprintf(&b, "%s\x00%d\x00%s\x00", m.Name, len(m.Source), m.Source)
	}
	digest := b.String()
	s.pol.mu.Lock()
	defer s.pol.mu.Unlock()
	if s.pol.set != nil && s.pol.digest == digest {
		return s.pol.set, nil
	}
	set, err := policy.CompileSet(ctx, mods)
	if err != nil {
		return nil, err
	}
	s.pol.digest, s.pol.set = digest, set
	return set, nil
}

// restriction is what restrict decided for one batch.
type restriction struct {
	refusals []fsm.Refusal
	reasons  map[string]int
}

func (r *restriction) count() int { return len(r.refusals) }

// restrict decides which of edge's changes the cloud refuses, strips every
// proof (it is never stored or forwarded), counts and logs refusals, and
// stamps their corrections after everything in the batch. Call it after the
// stamp policy, which folded the batch's stamps into the clock.
func (s *Service) restrict(ctx context.Context, edge string, changes []wire.Change) restriction {
	var r restriction
	var regions edgeRegions
	for i := range changes {
		c := &changes[i]
		reason := s.admit(ctx, edge, c, &regions)
		c.Proof = ""
		if reason == "" {
			continue
		}
		if r.reasons == nil {
			r.reasons = map[string]int{}
		}
		r.reasons[reason]++
		r.refusals = append(r.refusals, fsm.Refusal{Index: i, Reason: reason})
		s.m.refused.WithLabelValues(edge, reason).Inc()
		s.log.Warn("refused an edge's change under edge restriction; the edge's copy returns to the cloud's value",
			"edge", edge, "kind", c.Kind, "device", c.Device, "actor", c.Actor, "reason", reason)
	}
	if len(r.refusals) > 0 {
		stamp := s.clock.Now()
		for i := range r.refusals {
			r.refusals[i].Correct = stamp
		}
	}
	return r
}

// admit returns why the cloud refuses c from edge, or "" to accept it.
func (s *Service) admit(ctx context.Context, edge string, c *wire.Change, regions *edgeRegions) string {
	var lo, hi hlc.Timestamp
	switch c.Kind {
	case wire.KindUser:
		return RefuseUserChange
	case wire.KindDesired:
		if len(c.Doc) == 0 {
			return "" // emptied by the stamp policy: a no-op
		}
		for _, f := range c.Doc {
			if lo == 0 || f.Stamp < lo {
				lo = f.Stamp
			}
			hi = max(hi, f.Stamp)
		}
	case wire.KindMeta:
		if c.Meta == nil {
			return ""
		}
		lo, hi = c.Meta.Stamp, c.Meta.Stamp
	default:
		return "" // readings and reported state: the edge's own observations
	}
	if c.Kind == wire.KindDesired && strings.HasPrefix(c.Actor, RuleActorPrefix) {
		return s.admitRule(edge, c, regions)
	}
	if c.Proof == "" {
		return RefuseNoProof
	}
	v := s.cfg.Proofs
	if v == nil {
		is, err := s.issuer()
		if err != nil {
			return RefuseUntrustedKey // no deployment key yet: nothing can be proof
		}
		v = is
	}
	var claims uauth.Claims
	for _, at := range []hlc.Timestamp{lo, hi} {
		cl, err := v.VerifyAt(c.Proof, time.UnixMilli(at.WallMs()))
		switch {
		case errors.Is(err, uauth.ErrUnknownKey):
			return RefuseUntrustedKey
		case errors.Is(err, uauth.ErrTokenExpired):
			return RefuseExpired
		case err != nil:
			return RefuseInvalid
		}
		claims = cl
	}
	if c.Actor != "" && c.Actor != claims.OpenID {
		return RefuseActorMismatch
	}
	if s.cfg.Now().Sub(time.UnixMilli(lo.WallMs())) > s.cfg.MaxOffline {
		return RefuseTooOld
	}
	if s.sessionRevoked(claims) {
		return RefuseSessionRevoked
	}
	az := s.cfg.Authorizer
	if az == nil {
		var err error
		if az, err = s.authorizer(ctx); err != nil {
			s.log.Error("cannot compile the deployment's policies to re-authorise an edge's change", "err", err)
			return RefuseDenied
		}
	}
	user := policy.User{OpenID: claims.OpenID, Roles: []string{}, Regions: []string{}}
	if slices.Contains(s.cfg.Admins, claims.OpenID) {
		user.Roles = append(user.Roles, "admin")
	}
	if u, err := s.state.GetUser(claims.OpenID); err == nil {
		user.Roles = append(user.Roles, u.Roles...)
		user.Regions = append(user.Regions, u.Regions...)
	}
	res := policy.Resource{Kind: "device", ID: c.Device, Owners: []string{}, Tags: map[string]string{}}
	placedBy := edge // unknown to the cloud: the edge's API placed it in its own region
	if d, err := s.state.GetDevice(c.Device); err == nil {
		res.Owners = append(res.Owners, d.Owners...)
		res.Region = d.Region
		for k, v := range d.Tags {
			res.Tags[k] = v
		}
		if d.EdgeID != "" {
			placedBy = d.EdgeID
		}
		if !d.MetaStamp.IsZero() {
			placedBy = "" // an admin placed it
		}
	}
	if placedBy != "" && res.Region == "" {
		// No meta written yet: the device is where its home edge's
		// store put it, in that edge's region, as the edge's API sees it.
		res.Region = regions.of(s, placedBy)
	}
	action := actWriteDesired
	resources := []policy.Resource{res}
	if c.Kind == wire.KindMeta {
		action = actWriteMeta
		// Both the device as it is and as the change would make it.
		resources = append(resources, policy.Resource{Kind: "device", ID: c.Device, Owners: append([]string{}, c.Meta.Owners...),
			Region: c.Meta.Region, Tags: map[string]string(c.Meta.Tags)})
	}
	for _, r := range resources {
		if r.Tags == nil {
			r.Tags = map[string]string{}
		}
		d, err := az.Decide(ctx, policy.Input{User: user, Action: action, Resource: r})
		if err != nil || !d.Allow {
			return RefuseDenied
		}
	}
	return ""
}

// admitRule decides a desired change made by a rule at the edge. A rule the
// cloud distributes carries the cloud's authority, so the change needs no
// user's proof; but only that rule's own action is accepted: the rule
// must be one the cloud distributes to this edge's region, it must select
// the device (as the cloud sees the device), and one of its set_desired
// actions must write exactly the change's fields with the same values. An
// edge-local rule has only the edge's authority: its set_desired stays at
// the edge and is corrected back, like any unproven write.
func (s *Service) admitRule(edge string, c *wire.Change, regions *edgeRegions) string {
	name := strings.TrimPrefix(c.Actor, RuleActorPrefix)
	ps, err := s.sets() // rules move SetsIndex: the cached set is current
	if err != nil {
		return RefuseRuleNotDistributed
	}
	var rec *fsm.RuleRecord
	for i := range ps.rules {
		if ps.rules[i].Name == name {
			rec = &ps.rules[i]
			break
		}
	}
	if rec == nil || (rec.Region != "" && rec.Region != regions.of(s, edge)) {
		return RefuseRuleNotDistributed
	}
	var r rules.Rule
	if err := json.Unmarshal(rec.Rule, &r); err != nil {
		return RefuseRuleNotDistributed
	}
	dev := rules.Device{ID: c.Device}
	if d, err := s.state.GetDevice(c.Device); err == nil {
		dev.Region, dev.Tags = d.Region, d.Tags
	}
	if dev.Region == "" {
		dev.Region = regions.of(s, edge) // a device an edge first saw is in its region
	}
	if !r.Devices.Matches(dev) {
		return RefuseRuleMismatch
	}
	for _, a := range r.Actions {
		if sameFields(a.SetDesired, c.Doc) {
			return ""
		}
	}
	return RefuseRuleMismatch
}

// sameFields reports whether doc sets exactly the fields of want, to the
// same JSON values (compared compacted), and deletes none.
func sameFields(want map[string]json.RawMessage, doc shadow.Doc) bool {
	if len(want) == 0 || len(want) != len(doc) {
		return false
	}
	for k, v := range want {
		f, ok := doc[k]
		if !ok || f.Deleted || !jsonEqual(v, f.Value) {
			return false
		}
	}
	return true
}

func jsonEqual(a, b json.RawMessage) bool {
	var ca, cb bytes.Buffer
	if json.Compact(&ca, a) != nil || json.Compact(&cb, b) != nil {
		return false
	}
	return bytes.Equal(ca.Bytes(), cb.Bytes())
}

// edgeRegions is the directory's edge regions, read once per batch and only
// if needed.
type edgeRegions struct {
	m map[string]string
}

func (r *edgeRegions) of(s *Service, edge string) string {
	if r.m == nil {
		r.m = map[string]string{}
		if es, err := s.state.Edges(); err == nil {
			for _, e := range es {
				r.m[e.ID] = e.Region
			}
		}
	}
	return r.m[edge]
}

// SeqConflictError is a push that re-sends applied sequence numbers with
// other content; it matches ErrSeqConflict.
type SeqConflictError struct {
	Edge string
	Err  error // from the state machine, with the sequences
}

func (e *SeqConflictError) Error() string { return e.Err.Error() }

// Is makes a *SeqConflictError match ErrSeqConflict.
func (e *SeqConflictError) Is(target error) bool { return target == ErrSeqConflict }

func digests(changes []wire.Change) []wire.Digest {
	out := make([]wire.Digest, len(changes))
	for i := range changes {
		out[i] = changes[i].Digest()
	}
	return out
}

func refusedResult(r restriction) (int, map[string]int) { return r.count(), r.reasons }
