package service

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/ident"
	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// CloudRule is a rule the cloud distributes to edges, optionally only to
// the edges of one region.
type CloudRule struct {
	rules.Rule
	Region  string `json:"region,omitempty"`
	Version string `json:"version"`
}

// Rules is every distributed rule, by name.
func (s *Service) Rules(context.Context) ([]CloudRule, error) {
	recs, err := s.state.Rules()
	if err != nil {
		return nil, err
	}
	out := make([]CloudRule, 0, len(recs))
	for _, rec := range recs {
		var r rules.Rule
		if err := json.Unmarshal(rec.Rule, &r); err != nil {
			return nil, fmt.Errorf("stored rule %s: %w", rec.Name, err)
		}
		c, err := rules.Compile(r)
		version := ""
		if err == nil {
			version = c.Version
		}
		out = append(out, CloudRule{Rule: r, Region: rec.Region, Version: version})
	}
	return out, nil
}

// PutRule compiles r (the edges' own compiler: a rule that does not
// compile is refused with its message, matching wire.ErrInvalid, and
// nothing is distributed) and stores it for the edges of region, or of
// every region when it is "".
func (s *Service) PutRule(ctx context.Context, r rules.Rule, region string) (CloudRule, error) {
	if region != "" && !ident.Valid(region, wire.MaxRegion) {
		return CloudRule{}, &kindError{kind: wire.ErrInvalid, err: fmt.Errorf("region must match [A-Za-z0-9._-]{1,%d}", wire.MaxRegion)}
	}
	c, err := rules.Compile(r)
	if err != nil {
		return CloudRule{}, &kindError{kind: wire.ErrInvalid, err: fmt.Errorf("rule refused, nothing was distributed: %w", err)}
	}
	raw, err := json.Marshal(c.Rule)
	if err != nil {
		return CloudRule{}, err
	}
	if _, err := s.propose(ctx, &fsm.Command{Type: fsm.CmdRulePut, Rule: &fsm.RuleCmd{Name: c.Name, Region: region, Rule: raw}}); err != nil {
		return CloudRule{}, err
	}
	return CloudRule{Rule: c.Rule, Region: region, Version: c.Version}, nil
}

// DeleteRule stops distributing a rule; edges drop it with their next
// pull. ErrNotFound if there is no such rule.
func (s *Service) DeleteRule(ctx context.Context, name string) error {
	res, err := s.propose(ctx, &fsm.Command{Type: fsm.CmdRulePut, Rule: &fsm.RuleCmd{Name: name}})
	if err != nil {
		return err
	}
	if res.Applied == 0 {
		return fmt.Errorf("%w: rule %s", ErrNotFound, name)
	}
	return nil
}
