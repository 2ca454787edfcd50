// Package alerting runs the edge's rules: it evaluates every committed
// reading against the rule set in force (pkg/rules), keeps the alerts they
// raise in the store, publishes them on alerts/{device}, and runs the
// rules' actions, offline as online.
//
// Design note. The queue between ingest and the rules is the store's
// outbox, the commit-ordered log every committed reading is already in:
// the ingest writer only signals the runner after a commit (Notify, which
// never blocks and never delays an acknowledgement), and the runner reads
// the outbox from its own position in batches. Falling behind therefore
// drops nothing: the runner catches up from the store, and the store keeps
// an acknowledged outbox entry until the runner has passed it
// (store.Options.HoldOutboxForRules). The runner's position and the
// engine's states are saved in the same transaction, so a crash resumes
// exactly where the saved states were. At the edge that transaction is
// the ingest writer's next group commit (Config.Saver), so the rules cost
// no transaction or fsync of their own.
//
// One goroutine (Run) owns the engine. Rule swaps and acks reach it
// through a channel, so the engine needs no lock.
package alerting

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Store is what the runner needs from the edge's store.
type Store interface {
	Outbox(after uint64, max, maxBytes int) ([]store.Change, error)
	Counts() store.Counts
	RuleStates() (uint64, []rules.State, error)
	SaveRuleEvents(seq uint64, evs []rules.Event) error
	Device(id string) (*store.Device, error)
	SetDesiredBy(id string, patch map[string]json.RawMessage, by store.Actor) (*store.Device, error)
	MergeAlert(a rules.Alert) (rules.Alert, error)
	Alert(id string) (rules.Alert, error)
	LocalRules() ([]rules.Rule, error)
	PutLocalRule(r rules.Rule) error
	DeleteLocalRule(name string) error
}

// Saver saves what the engine did with the runner's new position, as
// store.SaveRuleEvents does, and returns once it is durable. The edge's is
// the ingest writer (ingest.Writer.SaveRuleEvents), whose group commits
// carry the saves.
type Saver interface {
	SaveRuleEvents(ctx context.Context, seq uint64, evs []rules.Event) error
}

// storeSaver saves in the store's own transactions.
type storeSaver struct{ st Store }

func (s storeSaver) SaveRuleEvents(_ context.Context, seq uint64, evs []rules.Event) error {
	return s.st.SaveRuleEvents(seq, evs)
}

// Downlink publishes to devices and subscribers.
type Downlink interface {
	Publish(topic string, payload []byte, retain bool, qos byte) error
}

// AlertTopic is where an alert of device is published.
func AlertTopic(device string) string { return "alerts/" + device }

// AlertQoS is the QoS alerts are published at.
const AlertQoS byte = 1

// ActorPrefix marks a change a rule made: its actor is "rule:" + the
// rule's name.
const ActorPrefix = "rule:"

// Config configures a Runner.
type Config struct {
	Store Store
	// Saver saves the engine's events and position; nil: the Store, a
	// transaction per save.
	Saver    Saver
	Downlink Downlink // nil: alerts and desired writes are stored, not published
	// Now is the wall clock rules time `for` by; Stamp issues HLC stamps.
	Now   func() time.Time
	Stamp func() hlc.Timestamp
	// Cloud is the cloud's rule set as last cached, put in force with the
	// edge-local rules when Run starts (SetCloud replaces it).
	Cloud []rules.Rule
	// Batch is how many outbox entries one evaluation pass reads.
	Batch      int
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// ErrStopped is returned by calls made after Run returned.
var ErrStopped = errors.New("alerting: runner stopped")

// ErrNotFound is returned by Ack for an alert the edge does not have.
var ErrNotFound = store.ErrNotFound

// Runner evaluates rules on committed readings.
type Runner struct {
	cfg  Config
	log  *slog.Logger
	m    *metrics
	wake chan struct{}
	cmds chan func(*rules.Engine)
	done chan struct{}

	// Owned by Run.
	swapped bool // a rule set was put in force: until then nothing is evaluated, or skipped
	src     sources
	seq     uint64    // evaluated up to here
	saved   uint64    // the position last saved
	savedAt time.Time // when
	// devices caches what rules see of each device. Every change to a
	// device's meta or reported state is an outbox entry, which the runner
	// reads in order, so it drops the entry there and the cache is exact.
	devices map[string]rules.Device
	metrics map[string]float64
}

// Bounds of the runner's lazy work: the device cache is emptied past
// maxCachedDevices, and a position that moved without any event is saved
// at most every positionEvery (a crash re-evaluates at most that much,
// which raises nothing twice: the states it would change were saved with
// every event).
const (
	maxCachedDevices = 1 << 16
	positionEvery    = time.Second
)

// New returns a runner; Run starts it.
func New(cfg Config) *Runner {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Batch <= 0 {
		cfg.Batch = 1000
	}
	if cfg.Saver == nil {
		cfg.Saver = storeSaver{cfg.Store}
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Runner{
		cfg: cfg, log: log, m: newMetrics(cfg.Registerer),
		wake: make(chan struct{}, 1), cmds: make(chan func(*rules.Engine)), done: make(chan struct{}),
		devices: map[string]rules.Device{}, metrics: map[string]float64{},
	}
}

// Notify tells the runner that readings were committed. It never blocks:
// a signal already pending covers this one.
func (r *Runner) Notify() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// do runs f on the engine's goroutine and waits for it.
func (r *Runner) do(ctx context.Context, f func(*rules.Engine)) error {
	finished := make(chan struct{})
	select {
	case r.cmds <- func(e *rules.Engine) { f(e); close(finished) }:
	case <-r.done:
		return ErrStopped
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-finished:
		return nil
	case <-r.done:
		return ErrStopped
	}
}

// Swap puts set in force as it is, whatever the sources say (for tests
// and tools; the edge uses PutLocal, DeleteLocal and SetCloud). The states
// it ends are saved before it returns.
func (r *Runner) Swap(ctx context.Context, set rules.Set) error {
	var err error
	if derr := r.do(ctx, func(e *rules.Engine) {
		evs := e.Swap(r.cfg.Now(), set)
		err = r.save(evs)
		r.m.rules.Set(float64(len(set)))
		r.swapped = true
	}); derr != nil {
		return derr
	}
	return err
}

// Rules is the set in force.
func (r *Runner) Rules(ctx context.Context) (rules.Set, error) {
	var set rules.Set
	err := r.do(ctx, func(e *rules.Engine) { set = e.Rules() })
	return set, err
}

// Ack acknowledges alert id as user by. An open alert is acked in the
// engine (it stays open until its clear condition holds); a cleared one is
// acked in the store.
func (r *Runner) Ack(ctx context.Context, id, by string) (rules.Alert, error) {
	var out rules.Alert
	var err error
	if derr := r.do(ctx, func(e *rules.Engine) {
		now := r.cfg.Now().UnixMilli()
		if ev, ok := e.Ack(id, by, now); ok {
			out = *ev.Alert
			err = r.save([]rules.Event{ev}) // publishes it
			return
		}
		device, rule, _, ok := rules.ParseAlertID(id)
		if !ok {
			err = ErrNotFound
			return
		}
		out, err = r.cfg.Store.MergeAlert(rules.Alert{ID: id, Rule: rule, Device: device,
			AckedAt: now, AckedBy: by, AckStamp: r.cfg.Stamp()})
		if err == nil {
			r.publish(out)
		}
	}); derr != nil {
		return rules.Alert{}, derr
	}
	return out, err
}

// MergeRemote folds a copy of an alert changed elsewhere (an ack made at
// the cloud, pulled by the syncer) into the edge's: through the engine when
// the alert is open there, into the store when it is not. A copy that
// changes nothing is not stored or published again. ErrNotFound if the
// edge has no such alert.
func (r *Runner) MergeRemote(ctx context.Context, a rules.Alert) (rules.Alert, error) {
	var out rules.Alert
	var err error
	if derr := r.do(ctx, func(e *rules.Engine) {
		if ev, ok := e.Merge(a); ok {
			out = *ev.Alert
			err = r.save([]rules.Event{ev}) // publishes it
			return
		}
		var before rules.Alert
		if before, err = r.cfg.Store.Alert(a.ID); err != nil {
			return
		}
		if out, err = r.cfg.Store.MergeAlert(a); err == nil && out != before {
			r.publish(out)
		}
	}); derr != nil {
		return rules.Alert{}, derr
	}
	return out, err
}

// Run evaluates until ctx ends. It returns nil on cancellation.
func (r *Runner) Run(ctx context.Context) error {
	defer close(r.done)
	seq, saved, err := r.cfg.Store.RuleStates()
	if err != nil {
		return fmt.Errorf("alerting: load rule states: %w", err)
	}
	r.seq, r.saved = seq, seq
	e := rules.NewEngine(saved, r.cfg.Stamp)
	defer r.savePosition()
	local, err := r.cfg.Store.LocalRules()
	if err != nil {
		return fmt.Errorf("alerting: load rules: %w", err)
	}
	// The rules in force from the start (possibly none): what was
	// committed while the edge was down is evaluated against them.
	if err := r.install(e, sources{local: local, cloud: r.cfg.Cloud}); err != nil {
		// Stored rules compiled when they were accepted; keep running
		// without them rather than not at all.
		r.log.Error("stored rules do not compile; running without them", "err", err)
		if err := r.install(e, sources{}); err != nil {
			return fmt.Errorf("alerting: %w", err)
		}
	}
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	r.Notify() // catch up with what was committed while stopped
	for {
		if due := e.NextDue(); !due.IsZero() {
			timer.Reset(max(due.Sub(r.cfg.Now()), time.Millisecond))
		} else {
			timer.Reset(time.Hour)
		}
		select {
		case <-ctx.Done():
			return nil
		case f := <-r.cmds:
			f(e)
		case <-r.wake:
			if err := r.catchUp(ctx, e); err != nil {
				r.log.Error("rule evaluation failed; retrying on the next commit", "err", err)
			}
			r.tick(e)
		case <-timer.C:
			r.tick(e)
		}
	}
}

// tick fires the pending rules whose for has elapsed.
func (r *Runner) tick(e *rules.Engine) {
	evs := e.Tick(r.cfg.Now())
	r.act(evs)
	if err := r.save(evs); err != nil {
		r.log.Error("save rule events", "err", err)
	}
}

// catchUp evaluates the outbox from the runner's position to its head, a
// batch per pass.
func (r *Runner) catchUp(ctx context.Context, e *rules.Engine) error {
	for r.swapped && ctx.Err() == nil {
		if more, err := r.pass(e); err != nil || !more {
			return err
		}
	}
	return nil
}

// pass evaluates one batch of the outbox from the runner's position; more
// is false once it is at the head.
func (r *Runner) pass(e *rules.Engine) (more bool, err error) {
	head := r.cfg.Store.Counts().OutboxHead
	r.m.lag.Set(float64(head - min(head, r.seq)))
	if r.seq >= head {
		return false, nil
	}
	if len(e.Rules()) == 0 {
		// Nothing to evaluate: move past what is there.
		r.seq = head
		r.maybeSavePosition()
		return true, nil
	}
	changes, err := r.cfg.Store.Outbox(r.seq, r.cfg.Batch, 8<<20)
	if err != nil {
		return false, err
	}
	if len(changes) == 0 {
		// Entries the store no longer holds (it did not hold the outbox
		// for the runner): nothing left to evaluate up to head.
		r.seq = head
		r.maybeSavePosition()
		return false, nil
	}
	var evs []rules.Event
	var causes []int64 // commit time (ms) of the reading behind each alert transition
	if len(r.devices) > maxCachedDevices {
		clear(r.devices)
	}
	now := r.cfg.Now()
	evaluated := 0
	for i := range changes {
		c := &changes[i]
		if c.Kind != store.ChangeReadings {
			if c.Kind == store.ChangeReported || c.Kind == store.ChangeMeta {
				delete(r.devices, c.Device) // what rules see of it changed
			}
			continue
		}
		d, err := r.device(c.Device)
		if err != nil {
			return false, err
		}
		for _, rd := range c.Readings {
			r.setMetrics(rd.Metrics)
			out, errs := e.Evaluate(now, d, r.metrics)
			evaluated++
			for _, ev := range out {
				if ev.Alert != nil {
					causes = append(causes, c.Stamp.WallMs())
				}
			}
			for _, err := range errs {
				r.m.errors.Inc()
				r.log.Debug("rule evaluation error", "err", err)
			}
			evs = append(evs, out...)
		}
	}
	r.m.evaluated.Add(float64(evaluated))
	r.act(evs)
	last := changes[len(changes)-1].Seq
	if len(evs) > 0 {
		if err := r.save1(last, evs); err != nil {
			return false, err
		}
	}
	r.seq = last
	r.maybeSavePosition()
	done := r.cfg.Now().UnixMilli()
	for _, ms := range causes {
		r.m.delay.Observe(float64(max(done-ms, 0)) / 1000)
	}
	return true, nil
}

// setMetrics makes r.metrics hold exactly ms. A device sends the same
// metrics reading after reading, so the map is overwritten in place and
// cleared only when it holds a name ms lacks: names in a reading are
// unique, so that is when it ends up larger than ms.
func (r *Runner) setMetrics(ms []store.Metric) {
	for _, m := range ms {
		r.metrics[m.Name] = m.Value
	}
	if len(r.metrics) == len(ms) {
		return
	}
	clear(r.metrics)
	for _, m := range ms {
		r.metrics[m.Name] = m.Value
	}
}

// device is what rules see of a device, cached until an outbox entry
// changes it (see Runner.devices).
func (r *Runner) device(id string) (rules.Device, error) {
	if d, ok := r.devices[id]; ok {
		return d, nil
	}
	sd, err := r.cfg.Store.Device(id)
	if errors.Is(err, store.ErrNotFound) {
		d := rules.Device{ID: id}.Prepared()
		r.devices[id] = d
		return d, nil
	}
	if err != nil {
		return rules.Device{}, fmt.Errorf("load device %s: %w", id, err)
	}
	d := rules.Device{ID: id, Region: sd.Meta.Region, Tags: sd.Meta.Tags, Reported: map[string]any{}}
	for name, raw := range sd.Reported.State() {
		var v any
		if json.Unmarshal(raw, &v) == nil {
			d.Reported[name] = v
		}
	}
	d = d.Prepared()
	r.devices[id] = d
	return d, nil
}

func (r *Runner) save(evs []rules.Event) error {
	if len(evs) == 0 {
		return nil
	}
	return r.save1(r.seq, evs)
}

// maybeSavePosition saves a position that moved without events, at most
// every positionEvery.
func (r *Runner) maybeSavePosition() {
	if r.seq != r.saved && r.cfg.Now().Sub(r.savedAt) >= positionEvery {
		r.savePosition()
	}
}

func (r *Runner) savePosition() {
	if r.seq == r.saved {
		return
	}
	if err := r.save1(r.seq, nil); err != nil {
		r.log.Warn("save rule runner position", "err", err)
	}
}

// save1 saves evs with the position seq, then publishes the alerts. The
// save is not bound to Run's context: the one Run makes as it returns
// must land too (the writer answers every save it takes, and once stopped
// leaves them to the store).
func (r *Runner) save1(seq uint64, evs []rules.Event) error {
	if err := r.cfg.Saver.SaveRuleEvents(context.Background(), seq, evs); err != nil {
		return err
	}
	r.saved, r.savedAt = max(r.saved, seq), r.cfg.Now()
	for _, ev := range evs {
		if ev.Alert != nil {
			r.publish(*ev.Alert)
		}
		switch ev.Kind {
		case rules.Fired:
			r.m.fired.Inc()
		case rules.Cleared:
			r.m.cleared.Inc()
		}
	}
	return nil
}

// act runs the actions of the rules that fired. A set_desired action is a
// desired write like any other, made by the rule; notify is the cloud's to
// send (the alert reaches it through sync).
func (r *Runner) act(evs []rules.Event) {
	for _, ev := range evs {
		if ev.Kind != rules.Fired || ev.Rule == nil {
			continue
		}
		for _, a := range ev.Rule.Actions {
			if len(a.SetDesired) == 0 {
				continue
			}
			d, err := r.cfg.Store.SetDesiredBy(ev.State.Device, a.SetDesired, store.Actor{OpenID: ActorPrefix + ev.Rule.Name})
			if err != nil {
				r.m.actionErrors.Inc()
				r.log.Error("rule action set_desired failed", "rule", ev.Rule.Name, "device", ev.State.Device, "err", err)
				continue
			}
			r.m.actions.Inc()
			if r.cfg.Downlink == nil {
				continue
			}
			payload, err := wire.DesiredPayload(d.Desired)
			if err == nil {
				err = r.cfg.Downlink.Publish(wire.DesiredTopic(d.ID), payload, true, wire.DesiredQoS)
			}
			if err != nil {
				r.log.Warn("desired-state downlink failed", "device", d.ID, "err", err)
			}
		}
	}
}

func (r *Runner) publish(a rules.Alert) {
	if r.cfg.Downlink == nil {
		return
	}
	payload, err := json.Marshal(a)
	if err == nil {
		err = r.cfg.Downlink.Publish(AlertTopic(a.Device), payload, false, AlertQoS)
	}
	if err != nil {
		r.log.Warn("alert publish failed", "alert", a.ID, "err", err)
	}
}
