package rules

import (
	"cmp"
	"fmt"
	"slices"
	"time"

	"github.com/expr-lang/expr/vm"

	"github.com/outpost-edge/outpost/pkg/hlc"
)

// Design note. The Engine is a state machine without I/O: the caller (the
// edge's rule runner) feeds it committed readings and clock ticks from one
// goroutine, persists the State of every Event it returns in the same
// transaction as the alert, and hands the engine its saved states after a
// restart (NewEngine). That keeps every timing decision testable with an
// injected clock, and a restart in the middle of a `for` loses nothing: the
// pending state is on disk with the wall time it began.
//
// Per rule and device there is at most one State, and in it at most one
// open alert: a rule that keeps holding does not raise a second one.
//
// Times are the edge's wall clock when the reading is evaluated (the
// caller's now), not the reading's timestamp: device clocks are not
// trusted to measure `for`, and a reading replayed after an overflow
// evaluates late rather than in the past.

// Key names one rule's state for one device.
type Key struct {
	Rule   string `json:"rule"`
	Device string `json:"device"`
}

// State is what the engine remembers of one rule for one device.
type State struct {
	Key
	// Version is the rule's Version when the state began; a changed rule
	// starts over.
	Version string `json:"version"`
	// PendingSince is when `when` began to hold, while the alert has not
	// fired yet (Alert nil), in Unix ms.
	PendingSince int64 `json:"pending_since,omitempty"`
	// Alert is the open alert, if any.
	Alert *Alert `json:"alert,omitempty"`
	// Value is the rule's first metric while pending (as saved: when
	// pending began; in memory: the latest): what Tick fires with when no
	// reading comes.
	Value float64 `json:"value,omitempty"`
}

// A State exists while its rule is pending (Alert nil) or its alert is
// open; an Event whose State has neither ended it.

// Ended reports whether the event ended its state: delete it rather than
// save it.
func (ev Event) Ended() bool { return ev.Kind == Reset || ev.Kind == Cleared }

// EventKind says what an Event did.
type EventKind int

// The events.
const (
	// Pending: `when` began to hold; the alert fires after the rule's for.
	Pending EventKind = iota + 1
	// Reset: a pending rule stopped holding before it fired.
	Reset
	// Fired: an alert was raised; run the rule's actions.
	Fired
	// Cleared: an open alert's clear condition held.
	Cleared
	// Changed: an open alert merged a remote transition (an ack).
	Changed
)

func (k EventKind) String() string {
	switch k {
	case Pending:
		return "pending"
	case Reset:
		return "reset"
	case Fired:
		return "fired"
	case Cleared:
		return "cleared"
	case Changed:
		return "changed"
	}
	return fmt.Sprintf("EventKind(%d)", int(k))
}

// Event is one state change; the caller persists State (or deletes it
// when Ended()) and, for Fired, runs Rule's actions.
type Event struct {
	Kind  EventKind
	Rule  *Compiled
	State State
	// Alert is the alert after the event (Fired, Cleared, Changed).
	Alert *Alert
}

// Engine evaluates a rule set. It is not safe for concurrent use: one
// goroutine owns it.
type Engine struct {
	set    Set
	byName map[string]*Compiled
	// byDevice holds the rules that name devices by id, under each id;
	// anyDevice the others. A reading is matched against its device's
	// list and anyDevice only (both in name order), not the whole set.
	byDevice  map[string][]*Compiled
	anyDevice []*Compiled
	states    map[Key]*State
	stamp     func() hlc.Timestamp
	machine   vm.VM
	env       *env
}

// NewEngine returns an engine with no rules that resumes from saved
// states; put the rule set in force with Swap, which settles the states of
// rules that are gone. stamp issues HLC stamps for alert transitions.
func NewEngine(saved []State, stamp func() hlc.Timestamp) *Engine {
	e := &Engine{states: map[Key]*State{}, byName: map[string]*Compiled{}, stamp: stamp, env: newEnv()}
	for i := range saved {
		s := saved[i]
		e.states[s.Key] = &s
	}
	return e
}

// Rules is the set in force.
func (e *Engine) Rules() Set { return e.set }

// Swap puts set in force. The state of a rule that is unchanged carries
// over; a pending state of a removed or changed rule is dropped (Reset),
// and an open alert of one is cleared, since nothing would ever clear it.
func (e *Engine) Swap(now time.Time, set Set) []Event {
	e.set = set
	e.byName = make(map[string]*Compiled, len(set))
	e.byDevice, e.anyDevice = map[string][]*Compiled{}, nil
	for _, c := range set {
		e.byName[c.Name] = c
		if len(c.Devices.IDs) == 0 {
			e.anyDevice = append(e.anyDevice, c)
			continue
		}
		for _, id := range c.Devices.IDs {
			if l := e.byDevice[id]; len(l) == 0 || l[len(l)-1] != c { // an id listed twice
				e.byDevice[id] = append(l, c)
			}
		}
	}
	var evs []Event
	for _, k := range e.sortedKeys() {
		s := e.states[k]
		if c := e.byName[k.Rule]; c != nil && c.Version == s.Version {
			continue
		}
		delete(e.states, k)
		if s.Alert != nil {
			evs = append(evs, e.clear(nil, s, now.UnixMilli()))
			continue
		}
		s.PendingSince = 0
		evs = append(evs, Event{Kind: Reset, State: *s})
	}
	return evs
}

func (e *Engine) sortedKeys() []Key {
	keys := make([]Key, 0, len(e.states))
	for k := range e.states {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, keyCmp)
	return keys
}

// keyCmp orders keys by rule, then device.
func keyCmp(a, b Key) int {
	return cmp.Or(cmp.Compare(a.Rule, b.Rule), cmp.Compare(a.Device, b.Device))
}

// Evaluate runs every rule that selects d against one committed reading.
// A rule whose expression fails at run time is skipped for this reading
// and its error returned (the caller counts and logs it).
func (e *Engine) Evaluate(now time.Time, d Device, metrics map[string]float64) ([]Event, []error) {
	var evs []Event
	var errs []error
	var env map[string]any
	ms := now.UnixMilli()
	for _, list := range [2][]*Compiled{e.byDevice[d.ID], e.anyDevice} {
		for _, c := range list {
			evs, errs, env = e.evaluate(c, ms, d, metrics, env, evs, errs)
		}
	}
	return evs, errs
}

// evaluate runs rule c on one reading, appending what happened to evs and
// errs; env is built on first use and returned for the next rule.
func (e *Engine) evaluate(c *Compiled, ms int64, d Device, metrics map[string]float64, env map[string]any,
	evs []Event, errs []error) ([]Event, []error, map[string]any) {
	if !c.Devices.Matches(d) || !hasAll(metrics, c.needs) {
		return evs, errs, env
	}
	if env == nil {
		env = e.env.fill(d, metrics)
	}
	k := Key{Rule: c.Name, Device: d.ID}
	s := e.states[k]
	if s != nil && s.Alert != nil {
		// Open: only the clear condition matters.
		var cleared bool
		var err error
		if c.clear != nil {
			cleared, err = eval(&e.machine, c.clear, env)
		} else {
			var held bool
			held, err = eval(&e.machine, c.when, env)
			cleared = !held
		}
		switch {
		case err != nil:
			errs = append(errs, fmt.Errorf("rule %s, device %s: clear: %w", c.Name, d.ID, err))
		case cleared:
			delete(e.states, k)
			evs = append(evs, e.clear(c, s, ms))
		}
		return evs, errs, env
	}
	held, err := eval(&e.machine, c.when, env)
	if err != nil {
		return evs, append(errs, fmt.Errorf("rule %s, device %s: when: %w", c.Name, d.ID, err)), env
	}
	switch {
	case !held && s != nil:
		delete(e.states, k)
		s.PendingSince = 0
		evs = append(evs, Event{Kind: Reset, Rule: c, State: *s})
	case !held:
	case s == nil && c.For > 0:
		s = &State{Key: k, Version: c.Version, PendingSince: ms, Value: metrics[c.first]}
		e.states[k] = s
		evs = append(evs, Event{Kind: Pending, Rule: c, State: *s})
	case s == nil:
		s = &State{Key: k, Version: c.Version}
		e.states[k] = s
		evs = append(evs, e.fire(c, s, ms, metrics[c.first]))
	default: // pending, still holding
		s.Value = metrics[c.first]
		if ms-s.PendingSince >= time.Duration(c.For).Milliseconds() {
			evs = append(evs, e.fire(c, s, ms, s.Value))
		}
	}
	return evs, errs, env
}

// Tick fires every pending state whose for has elapsed by now, so that a
// device that stops reporting while the condition holds (the freezer that
// reported -2 °C, then nothing) still raises its alert.
func (e *Engine) Tick(now time.Time) []Event {
	ms := now.UnixMilli()
	// The runner ticks after every commit, and mostly nothing is due: only
	// the due keys are collected and sorted.
	var due []Key
	for k, s := range e.states {
		if c := e.byName[k.Rule]; c != nil && s.Alert == nil && ms-s.PendingSince >= time.Duration(c.For).Milliseconds() {
			due = append(due, k)
		}
	}
	slices.SortFunc(due, keyCmp)
	var evs []Event
	for _, k := range due {
		s := e.states[k]
		evs = append(evs, e.fire(e.byName[k.Rule], s, ms, s.Value))
	}
	return evs
}

// NextDue is the earliest time Tick has something to do, or zero.
func (e *Engine) NextDue() time.Time {
	var due int64
	for k, s := range e.states {
		c := e.byName[k.Rule]
		if c == nil || s.Alert != nil {
			continue
		}
		if at := s.PendingSince + time.Duration(c.For).Milliseconds(); due == 0 || at < due {
			due = at
		}
	}
	if due == 0 {
		return time.Time{}
	}
	return time.UnixMilli(due)
}

func (e *Engine) fire(c *Compiled, s *State, ms int64, value float64) Event {
	st := e.stamp()
	s.PendingSince, s.Value = 0, 0
	s.Alert = &Alert{
		ID: AlertID(c.Name, s.Device, ms), Rule: c.Name, Device: s.Device, Severity: c.Severity,
		State: StateActive, Message: c.Message, Value: value, StartedAt: ms, Stamp: st,
	}
	a := *s.Alert
	return Event{Kind: Fired, Rule: c, State: *s, Alert: &a}
}

func (e *Engine) clear(c *Compiled, s *State, ms int64) Event {
	a := *s.Alert
	a.Merge(Alert{ClearedAt: ms, ClearStamp: e.stamp()})
	s.Alert = nil
	s.PendingSince = 0
	return Event{Kind: Cleared, Rule: c, State: *s, Alert: &a}
}

// Merge folds a remote copy of an alert (an ack at the cloud, an ack
// through the edge API) into the open alert it names. It returns a Changed
// event if the open alert changed, Cleared if the remote copy was cleared,
// or nothing for an alert that is not open here.
func (e *Engine) Merge(remote Alert) (Event, bool) {
	s := e.states[Key{Rule: remote.Rule, Device: remote.Device}]
	if s == nil || s.Alert == nil || s.Alert.ID != remote.ID {
		return Event{}, false
	}
	if !s.Alert.Merge(remote) {
		return Event{}, false
	}
	a := *s.Alert
	c := e.byName[remote.Rule]
	if !a.Open() {
		delete(e.states, s.Key)
		s.Alert = nil
		return Event{Kind: Cleared, Rule: c, State: *s, Alert: &a}, true
	}
	return Event{Kind: Changed, Rule: c, State: *s, Alert: &a}, true
}

// Ack acknowledges the open alert id as by at ms, as Merge of that
// transition.
func (e *Engine) Ack(id, by string, ms int64) (Event, bool) {
	device, rule, _, ok := ParseAlertID(id)
	if !ok {
		return Event{}, false
	}
	return e.Merge(Alert{ID: id, Rule: rule, Device: device, AckedAt: ms, AckedBy: by, AckStamp: e.stamp()})
}

// States is every state the engine holds, sorted, for a snapshot.
func (e *Engine) States() []State {
	out := make([]State, 0, len(e.states))
	for _, k := range e.sortedKeys() {
		out = append(out, *e.states[k])
	}
	return out
}

func hasAll(metrics map[string]float64, names []string) bool {
	for _, n := range names {
		if _, ok := metrics[n]; !ok {
			return false
		}
	}
	return true
}
