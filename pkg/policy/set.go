package policy

import (
	"context"
	"fmt"

	"github.com/open-policy-agent/opa/v1/rego"
)

// Set is a compiled module set held in memory, without a directory, reload
// or cache: what cloud-sync evaluates when it re-authorises a change an edge
// synced, with the same data.outpost.authz its edges run.
type Set struct {
	c *compiled
}

// CompileSet compiles modules (name → Rego source) into a Set. It fails as
// Reload would: on a compile error or without the decision rules.
func CompileSet(ctx context.Context, modules []Module) (*Set, error) {
	if len(modules) == 0 {
		return nil, ErrNoPolicy
	}
	sources := make(map[string]string, len(modules))
	for _, m := range modules {
		sources[m.Name] = m.Source
	}
	c, err := compile(ctx, sources)
	if err != nil {
		return nil, fmt.Errorf("policy: compile: %w", err)
	}
	return &Set{c: c}, nil
}

// Decide evaluates in; an error means no decision (treat it as a denial).
func (s *Set) Decide(ctx context.Context, in Input) (Decision, error) {
	rs, err := s.c.pq.Eval(ctx, rego.EvalParsedInput(in.astValue()))
	if err != nil {
		return Decision{}, fmt.Errorf("policy: evaluate %s on %s %q: %w", in.Action, in.Resource.Kind, in.Resource.ID, err)
	}
	d := Decision{Reason: "policy made no decision"}
	if len(rs) == 1 {
		allow, _ := rs[0].Bindings["allow"].(bool)
		reason, _ := rs[0].Bindings["reason"].(string)
		d = Decision{Allow: allow, Reason: reason}
	}
	return d, nil
}
