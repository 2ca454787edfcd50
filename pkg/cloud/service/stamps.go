package service

import (
	"errors"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// StampPolicy screens the HLC stamps of an edge's changes against this
// node's clock. A stamp further ahead than the clock's maximum drift is not
// trusted (adopting it would let one bad clock win every merge); every other
// stamp is folded into the clock, so that cloud-side writes are stamped
// after it.
//
// The policy never refuses a batch: a refusal would stall the edge's whole
// stream (its readings too) behind one bad clock. It drops the untrusted
// state fields, demotes untrusted meta and user records to the oldest stamp
// (kept, but losing to every real write), and reports each edit.
type StampPolicy struct {
	Clock *hlc.Clock
}

// StampDrop is one stamp the policy did not trust.
type StampDrop struct {
	Kind   string
	Device string
	// Field is the state field removed; empty for a meta or user record,
	// which is kept with a demoted stamp.
	Field string
	Stamp hlc.Timestamp
	// Reason is why, matching hlc.ErrDrift ("... 1h0m0s ahead (max 1m0s)").
	Reason error
}

// StampReport is what Screen did to a batch.
type StampReport struct {
	Drops []StampDrop
}

// Dropped is how many stamps were not trusted: what the edge is told as
// rejected_stamps.
func (r StampReport) Dropped() int { return len(r.Drops) }

// demoted is the stamp an untrusted meta or user record keeps: older than
// any real write.
const demoted hlc.Timestamp = 1

// Screen applies the policy to changes in place: it deletes untrusted fields
// from their Doc and demotes untrusted meta and user stamps. Changes left
// empty stay in place as no-ops, so that sequence numbers still line up.
// It fails only on a clock error other than drift.
func (p StampPolicy) Screen(changes []wire.Change) (StampReport, error) {
	var r StampReport
	for i := range changes {
		c := &changes[i]
		for name, f := range c.Doc {
			if _, err := p.Clock.Update(f.Stamp); err != nil {
				if !errors.Is(err, hlc.ErrDrift) {
					return StampReport{}, err
				}
				delete(c.Doc, name)
				r.Drops = append(r.Drops, StampDrop{Kind: c.Kind, Device: c.Device, Field: name, Stamp: f.Stamp, Reason: err})
			}
		}
		var stamp *hlc.Timestamp
		switch {
		case c.Kind == wire.KindMeta && c.Meta != nil:
			stamp = &c.Meta.Stamp
		case c.Kind == wire.KindUser && c.User != nil:
			stamp = &c.User.Stamp
		}
		if stamp != nil && !stamp.IsZero() {
			if _, err := p.Clock.Update(*stamp); err != nil {
				if !errors.Is(err, hlc.ErrDrift) {
					return StampReport{}, err
				}
				r.Drops = append(r.Drops, StampDrop{Kind: c.Kind, Device: c.Device, Stamp: *stamp, Reason: err})
				*stamp = demoted
			}
		}
	}
	return r, nil
}
