package alerting

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/outpost-edge/outpost/pkg/rules"
)

// Rule sources.
const (
	SourceLocal = "local" // the edge's own API (admin), kept in the store
	SourceCloud = "cloud" // distributed by cloud-sync, cached by the syncer
)

// ErrConflict refuses an edge-local rule named like a cloud rule.
var ErrConflict = errors.New("conflict")

// RuleInfo is one rule in force with where it came from.
type RuleInfo struct {
	rules.Rule
	Source  string `json:"source"`
	Version string `json:"version"`
}

// sources is the rules of each source; Run owns it.
type sources struct {
	local, cloud []rules.Rule
}

// set compiles the union, reusing the rules of prev (the set in force)
// that did not change. Every rule was compiled when it was accepted, so an
// error here is a bug or a library change; the caller keeps its set.
func (s *sources) set(prev rules.Set) (rules.Set, error) {
	return prev.Recompile(append(slices.Clone(s.cloud), s.local...))
}

func (s *sources) source(name string) string {
	if slices.ContainsFunc(s.cloud, func(r rules.Rule) bool { return r.Name == name }) {
		return SourceCloud
	}
	return SourceLocal
}

// List is the rules in force, by name.
func (r *Runner) List(ctx context.Context) ([]RuleInfo, error) {
	var out []RuleInfo
	err := r.do(ctx, func(e *rules.Engine) {
		for _, c := range e.Rules() {
			out = append(out, RuleInfo{Rule: c.Rule, Source: r.src.source(c.Name), Version: c.Version})
		}
	})
	return out, err
}

// PutLocal compiles and stores an edge-local rule and puts it in force.
// Errors: rules.ErrInvalid (it does not compile), ErrConflict (a cloud rule
// has the name).
func (r *Runner) PutLocal(ctx context.Context, rule rules.Rule) (RuleInfo, error) {
	c, err := rules.Compile(rule)
	if err != nil {
		return RuleInfo{}, err
	}
	var out RuleInfo
	if derr := r.do(ctx, func(e *rules.Engine) {
		if r.src.source(rule.Name) == SourceCloud {
			err = fmt.Errorf("%w: rule %s comes from the cloud; change it there, or pick another name", ErrConflict, rule.Name)
			return
		}
		next := sources{cloud: r.src.cloud, local: slices.DeleteFunc(slices.Clone(r.src.local),
			func(x rules.Rule) bool { return x.Name == rule.Name })}
		next.local = append(next.local, rule)
		if err = r.install(e, next, c); err != nil {
			return
		}
		if err = r.cfg.Store.PutLocalRule(rule); err != nil {
			return
		}
		out = RuleInfo{Rule: c.Rule, Source: SourceLocal, Version: c.Version}
	}); derr != nil {
		return RuleInfo{}, derr
	}
	return out, err
}

// DeleteLocal removes an edge-local rule; ErrNotFound if there is none.
func (r *Runner) DeleteLocal(ctx context.Context, name string) error {
	var err error
	if derr := r.do(ctx, func(e *rules.Engine) {
		n := len(r.src.local)
		next := sources{cloud: r.src.cloud, local: slices.DeleteFunc(slices.Clone(r.src.local),
			func(x rules.Rule) bool { return x.Name == name })}
		if len(next.local) == n {
			err = ErrNotFound
			return
		}
		if err = r.cfg.Store.DeleteLocalRule(name); err != nil {
			return
		}
		err = r.install(e, next)
	}); derr != nil {
		return derr
	}
	return err
}

// SetCloud puts the cloud's rule set in force (the syncer calls it with
// what it pulled). A set that does not compile is refused whole and the
// last good one stays; a local rule named like a cloud rule yields to it.
func (r *Runner) SetCloud(ctx context.Context, rs []rules.Rule) error {
	cs, err := rules.CompileSet(rs)
	if err != nil {
		return err
	}
	if derr := r.do(ctx, func(e *rules.Engine) {
		next := sources{cloud: rs, local: slices.DeleteFunc(slices.Clone(r.src.local), func(x rules.Rule) bool {
			return slices.ContainsFunc(rs, func(c rules.Rule) bool { return c.Name == x.Name })
		})}
		err = r.install(e, next, cs...)
	}); derr != nil {
		return derr
	}
	return err
}

// install compiles next and swaps it in; fresh are rules the caller has
// just compiled, which it need not compile again.
func (r *Runner) install(e *rules.Engine, next sources, fresh ...*rules.Compiled) error {
	set, err := next.set(append(slices.Clip(e.Rules()), fresh...))
	if err != nil {
		return err
	}
	evs := e.Swap(r.cfg.Now(), set)
	r.act(evs)
	if err := r.save(evs); err != nil {
		return err
	}
	r.src = next
	r.swapped = true
	r.m.rules.Set(float64(len(set)))
	r.Notify()
	return nil
}
