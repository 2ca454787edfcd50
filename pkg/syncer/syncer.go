// Package syncer reconciles an edge with its cloud: it drains the store's
// outbox to cloud-sync in large compressed batches and pulls cloud-side
// changes back, so an edge that was offline for any length of time converges
// with the cloud and loses nothing.
//
// Push. The outbox is one contiguous sequence; the cloud applies each
// sequence number of an edge exactly once and refuses gaps, so readings are
// committed exactly once whatever is resent. The local outbox is truncated
// only up to the sequence the cloud acknowledged after its raft commit. On
// start (and after every link failure) the syncer asks the cloud where it
// stands (heartbeat), so a crash between sending a batch and recording its
// ack neither loses nor duplicates anything: the cloud's acknowledged
// sequence is the truth.
//
// State before history. Device state (reported, desired, meta) and users
// are sent first, unsequenced, through /sync/v1/state: a device's current
// state reaches the cloud in one round trip even behind a million-reading
// backlog. They also stay in the sequenced stream, where their second
// application is a no-op because state changes are last-writer-wins deltas.
//
// Pull. Cloud-side changes (desired state, device meta, users' roles) are
// merged into the store with the same per-field last-writer-wins merge, a
// changed desired state goes to the device as a retained downlink, and the
// deployment's public keys, policies, edge directory and session revocations
// are kept so a restart without the cloud still has them.
//
// The syncer owns the push and pull loops, their cursors and the edge
// directory it caches for nearest-edge queries. It delegates the rest to the
// packages whose concern it is, through the small interfaces in Deps: the
// downlink encoding is wire's (DesiredPayload), installing distributed
// policy modules is policy's (Engine.Install), and trusting the deployment's
// keys is auth's (Keyring.SetTrusted). Login federation, which forwards
// logins to the cloud, lives in auth/federation and reads the Revocations
// kept here.
//
// Failures back off exponentially with full jitter (capped), and a 429's
// Retry-After is obeyed.
package syncer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/backoff"
	"github.com/outpost-edge/outpost/pkg/cloud/client"
	"github.com/outpost-edge/outpost/pkg/policy"
	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Keys of the syncer's state in the store's sync bucket.
const (
	keyPullCursor = "pull_cursor"
	keyLastSync   = "last_sync_ms"
	keyDirectory  = "directory"
	keyKeys       = "jwks"
	keyPolicies   = "policies_digest"
	keyVersions   = "set_versions" // wire.SetVersions JSON: what the sets kept here are at
	keyRules      = "cloud_rules"  // JSON []rules.Rule: the last good set the cloud distributed
)

// Config configures a Syncer.
type Config struct {
	EdgeID    string
	Region    string
	Location  *wire.Location
	Advertise string

	// BatchReadings is the target number of readings per push (default
	// 20000); BatchBytes bounds the encoded outbox entries read for one
	// push (default 4 MiB).
	BatchReadings int
	BatchBytes    int
	// InFlight is how many pushes may be outstanding at once (default 4):
	// the stages of a push (read and encode here; decode, raft
	// replication and apply in the cloud) overlap across pushes. With two,
	// a draining edge left half of the cluster idle.
	InFlight int
	// Idle is how often an idle syncer looks for new outbox entries
	// (default 20ms): the floor of live-sync latency.
	Idle time.Duration
	// PullWait is how long the cloud may hold a pull with nothing for
	// this edge (long-poll, default wire.MaxPullWait): a cloud-side change
	// arrives as soon as it commits, and an idle edge pulls once per wait.
	// PullInterval (default 1s) is the pause after an empty pull that came
	// back well before PullWait: a cloud that does not hold pulls (an
	// older release) is polled at that rate, as before.
	PullWait     time.Duration
	PullInterval time.Duration
	// HeartbeatInterval (default 5s) is the least time between heartbeats;
	// they go before a pull, so a held pull spaces them out to PullWait.
	// The cloud counts pulls as liveness too, so a heartbeat that would say
	// what the last one said waits for HeartbeatRefresh (default 60s, well
	// within the cloud's heartbeat_fresh of 90s): an idle edge makes one
	// request per PullWait, not two.
	HeartbeatInterval time.Duration
	HeartbeatRefresh  time.Duration
	// BackoffBase and BackoffMax bound the full-jitter backoff (defaults
	// 100ms and 30s).
	BackoffBase time.Duration
	BackoffMax  time.Duration
	// MaxOffline is the longest offline window the deployment allows; the
	// cloud keeps tombstones at least this long. An edge whose last pull is
	// older re-pulls everything from the start (full resync). Default 30
	// days.
	MaxOffline time.Duration
	// AfterAck, when set, is called with the acknowledged sequence for each
	// push the cloud acknowledged, before the syncer records the
	// acknowledgement. Nil in production. Crash tests set it to kill the
	// process in that window, proving a crash there neither loses nor
	// duplicates anything.
	AfterAck func(ackedSeq uint64)
	// Now is the edge's clock (the one its HLC reads), used to measure its
	// offset from the cloud's. Default time.Now.
	Now func() time.Time

	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

func (c *Config) defaults() {
	if c.BatchReadings <= 0 {
		c.BatchReadings = 20000
	}
	if c.InFlight <= 0 {
		c.InFlight = 4
	}
	if c.BatchBytes <= 0 {
		c.BatchBytes = 4 << 20
	}
	if c.Idle <= 0 {
		c.Idle = 20 * time.Millisecond
	}
	if c.PullWait <= 0 {
		c.PullWait = wire.MaxPullWait
	}
	if c.PullInterval <= 0 {
		c.PullInterval = time.Second
	}
	if c.HeartbeatInterval <= 0 {
		c.HeartbeatInterval = 5 * time.Second
	}
	if c.HeartbeatRefresh <= 0 {
		c.HeartbeatRefresh = time.Minute
	}
	if c.BackoffBase <= 0 {
		c.BackoffBase = 100 * time.Millisecond
	}
	if c.BackoffMax <= 0 {
		c.BackoffMax = 30 * time.Second
	}
	if c.MaxOffline <= 0 {
		c.MaxOffline = 30 * 24 * time.Hour
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// Downlink publishes messages to devices (the embedded broker, or the
// subscriber of an external one).
type Downlink interface {
	Publish(topic string, payload []byte, retain bool, qos byte) error
}

// Policies installs the policy modules the cloud distributes
// (*policy.Engine).
type Policies interface {
	Install(ctx context.Context, modules []policy.Module) error
}

// Rules is the edge's rule runner (*alerting.Runner): SetCloud puts the
// cloud's rule set in force (the whole set or, when it does not compile,
// rules.ErrInvalid and nothing); MergeRemote applies a pulled alert.
type Rules interface {
	SetCloud(ctx context.Context, rs []rules.Rule) error
	// MergeRemote folds an alert changed at the cloud into the edge's.
	MergeRemote(ctx context.Context, a rules.Alert) (rules.Alert, error)
}

// CachedRules is the cloud's rule set as the syncer last cached it (the
// last good one), for the edge to put in force at start, before any pull.
func CachedRules(st *store.Store) ([]rules.Rule, error) {
	v, err := st.SyncValue(keyRules)
	if err != nil || len(v) == 0 {
		return nil, err
	}
	var rs []rules.Rule
	if err := json.Unmarshal(v, &rs); err != nil {
		return nil, fmt.Errorf("cached cloud rules: %w", err)
	}
	return rs, nil
}

// Deps are the syncer's collaborators.
type Deps struct {
	Store  *store.Store
	Client *client.Client
	// Keys receives the deployment's public keys (SetTrusted).
	Keys *auth.Keyring
	// Downlink publishes desired state to devices (retained); nil skips.
	Downlink Downlink
	// Policies receives the cloud's policy modules; nil disables policy
	// distribution (the edge keeps its local policies).
	Policies Policies
	// BuiltinPolicies is what Policies gets when the cloud's set becomes
	// empty: the edge's own (built-in or local) policy modules.
	BuiltinPolicies []policy.Module
	// Rules receives the rules the cloud distributes to this edge; nil
	// ignores them.
	Rules Rules
	// DataChanged is called after roles or device meta changed (policy
	// decision caches depend on them).
	DataChanged func()
}

// Syncer is the edge's sync engine. Besides Run and Flush it serves the
// API's view of the link (Status) and the cached directory (Nearest).
type Syncer struct {
	cfg  Config
	deps Deps
	log  *slog.Logger
	m    *metrics

	cursor    atomic.Uint64 // highest sequence the cloud acknowledged
	stateSent atomic.Uint64 // highest state sequence sent ahead
	connected atomic.Bool
	lastSync  atomic.Int64 // Unix ms of the last successful exchange
	offsetMs  atomic.Int64 // local clock minus the cloud's, at the last heartbeat
	pushMu    sync.Mutex   // serialises pushWindow between the push loop and Flush
	ackMu     sync.Mutex   // serialises outbox truncation
	ackCh     chan struct{}

	dirMu sync.RWMutex
	dir   []wire.Edge

	have wire.SetVersions // versions of the sets kept here; owned by the pull loop

	revs *Revocations

	wake chan struct{}
}

// New builds a syncer; Run starts it. Cached state (directory, last sync) is
// loaded from the store so that an edge restarted offline serves it at once.
func New(cfg Config, deps Deps) (*Syncer, error) {
	cfg.defaults()
	if deps.Store == nil || deps.Client == nil {
		return nil, errors.New("syncer: store and client are required")
	}
	s := &Syncer{cfg: cfg, deps: deps, log: cfg.Logger, m: newMetrics(cfg.Registerer, deps.Store),
		wake: make(chan struct{}, 1), ackCh: make(chan struct{}, 1)}
	s.cursor.Store(deps.Store.Counts().OutboxAcked)
	revs, err := loadRevocations(deps.Store, cfg.Now)
	if err != nil {
		return nil, err
	}
	s.revs = revs
	if v, err := deps.Store.SyncValue(keyLastSync); err != nil {
		return nil, err
	} else if len(v) > 0 {
		var ms int64
		if err := json.Unmarshal(v, &ms); err == nil {
			s.lastSync.Store(ms)
		}
	}
	if v, err := deps.Store.SyncValue(keyVersions); err != nil {
		return nil, err
	} else if len(v) > 0 {
		if err := json.Unmarshal(v, &s.have); err != nil {
			s.have = wire.SetVersions{} // pull every set whole again
		}
	}
	if v, err := deps.Store.SyncValue(keyDirectory); err != nil {
		return nil, err
	} else if len(v) > 0 {
		if err := json.Unmarshal(v, &s.dir); err != nil {
			s.log.Warn("cached edge directory unreadable; waiting for the cloud", "err", err)
		}
	}
	return s, nil
}

// Revocations is the set of sessions the cloud revoked, as of the last
// pull, for the identity service (auth/federation) to refuse.
func (s *Syncer) Revocations() *Revocations { return s.revs }

// Run pushes and pulls until ctx ends. It owns three goroutines and returns
// after both stopped.
func (s *Syncer) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { defer wg.Done(); s.ackLoop(ctx) }()
	go func() { defer wg.Done(); s.pushLoop(ctx) }()
	go func() { defer wg.Done(); s.pullLoop(ctx) }()
	wg.Wait()
	return nil
}

// Kick wakes the push loop early (after a local write).
func (s *Syncer) Kick() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Status reports whether the last exchange with the cloud succeeded, and
// when the last successful one was (zero if never).
func (s *Syncer) Status() (connected bool, lastSync time.Time) {
	if ms := s.lastSync.Load(); ms > 0 {
		lastSync = time.UnixMilli(ms)
	}
	return s.connected.Load(), lastSync
}

// ClockOffset is how far the edge's clock was ahead of the cloud's at the
// last heartbeat (negative: behind).
func (s *Syncer) ClockOffset() time.Duration {
	return time.Duration(s.offsetMs.Load()) * time.Millisecond
}

func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// failed records a failed exchange and returns how long to wait.
func (s *Syncer) failed(op string, err error, bo *backoff.Backoff) time.Duration {
	var th *client.ThrottledError
	if errors.As(err, &th) {
		s.m.retries.WithLabelValues(op, "throttled").Inc()
		return ThrottleWait(th.RetryAfter)
	}
	s.connected.Store(false)
	s.m.connected.Set(0)
	s.m.retries.WithLabelValues(op, "error").Inc()
	d := bo.Next()
	if errors.Is(err, client.ErrUntrustedCertificate) {
		// Not a passing outage: say so where an operator looks.
		s.log.Error("cloud refused: its TLS certificate is not trusted; working offline", "op", op, "err", err, "wait", d)
		return d
	}
	s.log.Debug("sync exchange failed; backing off", "op", op, "err", err, "wait", d)
	return d
}

// ThrottleWait is how long an edge waits after a 429 whose Retry-After is
// retryAfter: that, plus jitter of up to a quarter of it but at most a
// second, so that edges told the same (whole) second do not all return in
// the same instant. The cloud tells a write refused at once to come back
// in a second (one that waited out the admission wait, when it expects
// room), so the capped jitter spreads that second; jitter proportional to
// long waits would only make those edges come back later still.
func ThrottleWait(retryAfter time.Duration) time.Duration {
	return retryAfter + time.Duration(rand.Int64N(int64(min(retryAfter/4, time.Second))+1))
}

func (s *Syncer) succeeded() {
	now := time.Now().UnixMilli()
	s.lastSync.Store(now)
	s.connected.Store(true)
	s.m.connected.Set(1)
	s.m.lastSync.Set(float64(now) / 1000)
}

// ---- push ----

func (s *Syncer) pushLoop(ctx context.Context) {
	bo := backoff.Backoff{Base: s.cfg.BackoffBase, Max: s.cfg.BackoffMax}
	synced := false // the cursor was confirmed with the cloud since the last failure
	alerts := alertPusher{bo: backoff.Backoff{Base: s.cfg.BackoffBase, Max: s.cfg.BackoffMax}}
	idle := time.NewTicker(s.cfg.Idle)
	defer idle.Stop()
	for ctx.Err() == nil {
		if !synced {
			if err := s.resume(ctx); err != nil {
				if ctx.Err() == nil && !sleep(ctx, s.failed("heartbeat", err, &bo)) {
					return
				}
				continue
			}
			synced = true
		}
		n, err := s.pushWindow(ctx, s.cfg.InFlight)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			var gap *client.GapError
			if errors.As(err, &gap) {
				s.m.retries.WithLabelValues("push", "gap").Inc()
				synced = false // ask the cloud where it stands
				continue
			}
			var apiErr *client.APIError
			if errors.As(err, &apiErr) && apiErr.Status == 422 {
				// The cloud applied these sequence numbers with other
				// content: someone else pushed with this edge's token, or
				// two edges share its id. Retrying cannot fix it, and the
				// outbox keeps the changes; an operator must look.
				s.m.retries.WithLabelValues("push", "conflict").Inc()
				s.log.Error("the cloud refuses this edge's changes: their sequence numbers were already used with other content; is this edge's token or id used elsewhere?",
					"err", err)
			}
			if !sleep(ctx, s.failed("push", err, &bo)) {
				return
			}
			synced = false
			continue
		}
		bo.Reset()
		if n > 0 {
			continue // more may be waiting: drain without pausing
		}
		s.pushAlerts(ctx, &alerts)
		select {
		case <-ctx.Done():
			return
		case <-idle.C:
		case <-s.wake:
		}
	}
}

// alertPusher is the push loop's state for the alert outbox: alerts have
// their own backoff, so a cloud that refuses them (an older release
// answers 404) never slows the sequenced stream.
type alertPusher struct {
	bo      backoff.Backoff
	next    time.Time // no attempt before
	refused bool      // the last attempt was refused: logged once
}

// alertBatch bounds one alert push (about 300 bytes an alert).
const alertBatch = 200

// pushAlerts sends the alert outbox (the latest value of each alert that
// changed since the cloud last took it), when the stream is idle.
func (s *Syncer) pushAlerts(ctx context.Context, p *alertPusher) {
	if time.Now().Before(p.next) {
		return
	}
	for ctx.Err() == nil {
		pending, err := s.deps.Store.PendingAlerts(alertBatch)
		if err != nil {
			s.log.Error("read the alert outbox", "err", err)
			p.next = time.Now().Add(p.bo.Next())
			return
		}
		if len(pending) == 0 {
			return
		}
		b := &wire.AlertBatch{Edge: s.cfg.EdgeID, Alerts: make([]json.RawMessage, 0, len(pending))}
		for i := range pending {
			raw, err := json.Marshal(&pending[i])
			if err != nil {
				s.log.Error("encode alert", "err", err)
				return
			}
			b.Alerts = append(b.Alerts, raw)
		}
		_, err = s.deps.Client.Alerts(ctx, b)
		var apiErr *client.APIError
		switch {
		case errors.As(err, &apiErr) && (apiErr.Status == 404 || apiErr.Status == 400):
			// An older cloud (no such route) or one that refuses these
			// alerts: they stay queued and are offered again later.
			if !p.refused {
				s.log.Warn("the cloud does not take this edge's alerts; they stay queued at the edge", "alerts", len(pending), "err", err)
			}
			p.refused = true
			p.next = time.Now().Add(s.cfg.BackoffMax)
			s.m.retries.WithLabelValues("alerts", "refused").Inc()
			return
		case err != nil:
			p.next = time.Now().Add(p.bo.Next())
			s.m.retries.WithLabelValues("alerts", "error").Inc()
			return
		}
		p.bo.Reset()
		p.refused = false
		if err := s.deps.Store.AlertsSent(pending); err != nil {
			s.log.Error("record alerts sent", "err", err)
			return
		}
		if len(pending) < alertBatch {
			return
		}
	}
}

// resume asks the cloud for its acknowledged sequence and reconciles the
// local cursor with it. If the cloud holds more than the outbox recorded (a
// crash after the cloud committed but before the local ack), the syncer
// does not take the cloud's word for it: it re-sends from its own record,
// and the cloud acknowledges the re-sent changes as duplicates only if they
// are what it applied. Otherwise someone else pushed those sequence numbers
// with this edge's token (sequence squatting), and the cloud's error stops
// the edge from truncating changes the cloud never received.
func (s *Syncer) resume(ctx context.Context) error {
	res, err := s.heartbeat(ctx)
	if err != nil {
		return err
	}
	local := s.deps.Store.Counts()
	switch {
	case res.AckedSeq > local.OutboxHead:
		return fmt.Errorf("cloud acknowledged sequence %d of edge %s but this edge's outbox ends at %d: is another edge using this id, or was the data directory replaced?",
			res.AckedSeq, s.cfg.EdgeID, local.OutboxHead)
	case res.AckedSeq > local.OutboxAcked:
		s.log.Info("cloud already held changes the outbox had not recorded as acknowledged; re-sending them for the cloud to confirm",
			"from", local.OutboxAcked, "to", res.AckedSeq)
	case res.AckedSeq < local.OutboxAcked:
		// The cloud lost what it acknowledged (a cluster rebuilt from
		// scratch). The outbox no longer holds those changes.
		s.log.Error("cloud is behind this edge's acknowledged sequence; changes it lost cannot be resent",
			"cloud_acked", res.AckedSeq, "local_acked", local.OutboxAcked)
	}
	s.cursor.Store(local.OutboxAcked)
	s.m.acked.Set(float64(s.cursor.Load()))
	return nil
}

// HeartbeatDue reports whether a heartbeat goes before the next pull, since
// the last one and with same saying whether it would repeat the last one.
// The fleet simulator (cmd/fleetbench) keeps the same cadence through it.
func (c *Config) HeartbeatDue(since time.Duration, same bool) bool {
	return since >= c.HeartbeatInterval && (!same || since >= c.HeartbeatRefresh)
}

// SameHeartbeat reports whether a and b say the same.
func SameHeartbeat(a, b *wire.Heartbeat) bool {
	la, lb := a.Location, b.Location
	return a.Edge == b.Edge && a.Region == b.Region && a.Advertise == b.Advertise && a.Backlog == b.Backlog &&
		a.OldestUnsyncedMs == b.OldestUnsyncedMs && (la == lb || la != nil && lb != nil && *la == *lb)
}

func (s *Syncer) heartbeat(ctx context.Context) (*wire.HeartbeatResult, error) {
	return s.sendHeartbeat(ctx, s.heartbeatBody())
}

// heartbeatBody is what a heartbeat says now.
func (s *Syncer) heartbeatBody() *wire.Heartbeat {
	c := s.deps.Store.Counts()
	h := &wire.Heartbeat{Edge: s.cfg.EdgeID, Region: s.cfg.Region, Location: s.cfg.Location,
		Advertise: s.cfg.Advertise, Backlog: c.OutboxBacklog}
	if ts, err := s.deps.Store.OldestUnsynced(); err == nil && !ts.IsZero() {
		h.OldestUnsyncedMs = ts.WallMs()
	}
	return h
}

func (s *Syncer) sendHeartbeat(ctx context.Context, h *wire.Heartbeat) (*wire.HeartbeatResult, error) {
	sent := s.cfg.Now()
	res, err := s.deps.Client.Heartbeat(ctx, h)
	if err != nil {
		return nil, err
	}
	rtt := s.cfg.Now().Sub(sent)
	off := sent.Add(rtt/2).UnixMilli() - res.ServerTimeMs
	s.offsetMs.Store(off)
	s.m.clockOffset.Set(float64(off) / 1000)
	s.succeeded()
	return res, nil
}

// Flush pushes until the cloud acknowledged everything the outbox held when
// it was called, or ctx ends, and records the acknowledgement: the last step
// of a graceful shutdown, after ingest stopped. It is safe to call while Run
// is still stopping.
func (s *Syncer) Flush(ctx context.Context) error {
	target := s.deps.Store.Counts().OutboxHead
	for s.cursor.Load() < target {
		if !s.connected.Load() {
			return errors.New("syncer: flush skipped: the cloud is not reachable; the outbox keeps the backlog")
		}
		if _, err := s.pushWindow(ctx, 1); err != nil {
			return fmt.Errorf("syncer: flush: %w", err)
		}
	}
	return s.ackRecorded()
}

// sendState sends the state changes not yet sent ahead of the sequenced
// stream.
func (s *Syncer) sendState(ctx context.Context) (int, error) {
	after := max(s.stateSent.Load(), s.cursor.Load())
	if after >= s.deps.Store.Counts().OutboxHead {
		return 0, nil
	}
	state, err := s.deps.Store.PendingState(after, 1000)
	if err != nil || len(state) == 0 {
		return 0, err
	}
	b := &wire.StateBatch{Edge: s.cfg.EdgeID, Changes: make([]wire.Change, 0, len(state))}
	for i := range state {
		b.Changes = append(b.Changes, toWire(&state[i]))
	}
	res, err := s.deps.Client.State(ctx, b)
	if err != nil {
		return 0, err
	}
	s.stateSent.Store(state[len(state)-1].Seq)
	s.m.rejected.Add(float64(res.RejectedStamps))
	return len(state), nil
}

// buildBatch reads the next batch of the sequenced stream after after; nil
// when the outbox holds nothing more.
func (s *Syncer) buildBatch(after uint64) (*wire.PushBatch, int, error) {
	changes, err := s.deps.Store.Outbox(after, wire.MaxBatchChanges, s.cfg.BatchBytes)
	if err != nil || len(changes) == 0 {
		return nil, 0, err
	}
	if changes[0].Seq != after+1 {
		return nil, 0, fmt.Errorf("outbox starts at %d, expected %d", changes[0].Seq, after+1)
	}
	b := &wire.PushBatch{Edge: s.cfg.EdgeID, FirstSeq: changes[0].Seq, Changes: make([]wire.Change, 0, len(changes))}
	readings := 0
	for i := range changes {
		n := len(changes[i].Readings)
		if i > 0 && (readings+n > s.cfg.BatchReadings || readings+n > wire.MaxReadingsTotal) {
			break
		}
		readings += n
		b.Changes = append(b.Changes, toWire(&changes[i]))
	}
	return b, readings, nil
}

type flight struct {
	b        *wire.PushBatch
	readings int
	start    time.Time
	done     chan flightResult
}

type flightResult struct {
	res *wire.PushResult
	err error
}

// pushWindow sends pending state ahead, then drains the sequenced stream
// with up to window pushes in flight (the cloud queues an edge's pushes in
// sequence order), handling acknowledgements in order. It returns how many
// changes the cloud acknowledged, and the first error.
func (s *Syncer) pushWindow(ctx context.Context, window int) (int, error) {
	s.pushMu.Lock()
	defer s.pushMu.Unlock()
	sent, err := s.sendState(ctx)
	if err != nil {
		return 0, err
	}
	next := s.cursor.Load()
	var q []*flight
	var firstErr error
	for {
		for len(q) < window && firstErr == nil && next < s.deps.Store.Counts().OutboxHead {
			b, readings, err := s.buildBatch(next)
			if err != nil {
				firstErr = err
				break
			}
			if b == nil {
				break
			}
			f := &flight{b: b, readings: readings, start: time.Now(), done: make(chan flightResult, 1)}
			go func() {
				res, err := s.deps.Client.Push(ctx, f.b)
				f.done <- flightResult{res, err}
			}()
			q = append(q, f)
			next = b.LastSeq()
			if ctx.Err() != nil {
				break
			}
		}
		if len(q) == 0 {
			break
		}
		f := q[0]
		q = q[1:]
		r := <-f.done
		if r.err != nil {
			if firstErr == nil {
				firstErr = r.err
			}
			continue // collect the rest of the window
		}
		s.record(f, r.res)
		sent += len(f.b.Changes)
	}
	if sent > 0 {
		s.succeeded()
	}
	return sent, firstErr
}

// record takes in an acknowledged push: the cloud committed through
// res.AckedSeq in raft, so only now may the outbox forget those changes.
// The truncation itself runs in the background (ackLoop); a crash before it
// is harmless because resume learns the cloud's sequence first.
func (s *Syncer) record(f *flight, res *wire.PushResult) {
	if s.cfg.AfterAck != nil {
		s.cfg.AfterAck(res.AckedSeq)
	}
	if res.AckedSeq > s.cursor.Load() {
		s.cursor.Store(res.AckedSeq)
		s.m.acked.Set(float64(res.AckedSeq))
		select {
		case s.ackCh <- struct{}{}:
		default:
		}
	}
	s.m.pushSeconds.Observe(time.Since(f.start).Seconds())
	s.m.batchChanges.Observe(float64(len(f.b.Changes)))
	s.m.batchReadings.Observe(float64(f.readings))
	s.m.pushedReadings.Add(float64(f.readings))
	s.m.rejected.Add(float64(res.RejectedStamps))
}

// ackLoop truncates the outbox up to the acknowledged cursor, off the push
// path, and once more when ctx ends.
func (s *Syncer) ackLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			if err := s.ackRecorded(); err != nil {
				s.log.Warn("truncate outbox at shutdown", "err", err)
			}
			return
		case <-s.ackCh:
		}
		if err := s.ackRecorded(); err != nil {
			s.log.Error("truncate outbox", "err", err)
		}
	}
}

func (s *Syncer) ackRecorded() error {
	s.ackMu.Lock()
	defer s.ackMu.Unlock()
	cur := s.cursor.Load()
	if cur <= s.deps.Store.Counts().OutboxAcked {
		return nil
	}
	return s.deps.Store.AckOutbox(cur)
}

// toWire converts an outbox entry to its wire form, with the proof of the
// user who made it.
func toWire(c *store.Change) wire.Change {
	w := wire.Change{Kind: c.Kind.String(), Device: c.Device, Actor: c.By.OpenID, Proof: c.By.Proof}
	switch c.Kind {
	case store.ChangeReadings:
		// Metrics go sorted (wire.Reading.Sorted), cut from one slab per
		// change: the push codec writes them without a map.
		w.Readings = make([]wire.Reading, len(c.Readings))
		n := 0
		for i := range c.Readings {
			n += len(c.Readings[i].Metrics)
		}
		slab := make([]wire.Metric, 0, n)
		for i := range c.Readings {
			r := &c.Readings[i]
			w.Readings[i] = wire.Reading{TS: r.TS, ID: r.ID}
			at := len(slab)
			for _, mv := range r.Metrics {
				slab = append(slab, wire.Metric{Name: mv.Name, Value: mv.Value})
			}
			ms, unique := wire.SortMetrics(slab[at:len(slab):len(slab)])
			if !unique {
				// The store keeps names unique; if one is there twice,
				// the last value wins, as it did through a map.
				m := make(map[string]float64, len(r.Metrics))
				for _, mv := range r.Metrics {
					m[mv.Name] = mv.Value
				}
				w.Readings[i].Metrics = m
				continue
			}
			w.Readings[i].Sorted = ms
		}
	case store.ChangeReported, store.ChangeDesired:
		// A value stored before the JSON rules existed travels as null:
		// the cloud refuses a batch holding it, which would stall the
		// stream for good.
		w.Doc, _ = wire.ScrubDoc(c.Doc)
	case store.ChangeMeta:
		w.Meta = &wire.Meta{Owners: c.Meta.Owners, Region: c.Meta.Region, Tags: c.Meta.Tags, Stamp: c.Meta.Stamp}
	case store.ChangeUser:
		w.Device = ""
		w.User = &wire.User{OpenID: c.User.OpenID, Roles: c.User.Roles, Regions: c.User.Regions, Stamp: c.User.Stamp}
	}
	return w
}

// fromWire converts a pulled change to the store's form.
func fromWire(w *wire.Change) (store.Change, bool) {
	c := store.Change{Device: w.Device}
	switch w.Kind {
	case wire.KindDesired:
		c.Kind, c.Doc = store.ChangeDesired, w.Doc
	case wire.KindReported:
		c.Kind, c.Doc = store.ChangeReported, w.Doc
	case wire.KindMeta:
		if w.Meta == nil {
			return c, false
		}
		c.Kind = store.ChangeMeta
		c.Meta = &store.DeviceMeta{Owners: w.Meta.Owners, Region: w.Meta.Region, Tags: w.Meta.Tags, Stamp: w.Meta.Stamp}
	case wire.KindUser:
		if w.User == nil {
			return c, false
		}
		c.Kind, c.Device = store.ChangeUser, w.User.OpenID
		c.User = &store.User{OpenID: w.User.OpenID, Roles: w.User.Roles, Regions: w.User.Regions, Stamp: w.User.Stamp}
	default:
		return c, false
	}
	return c, true
}

// ---- pull ----

func (s *Syncer) pullLoop(ctx context.Context) {
	bo := backoff.Backoff{Base: s.cfg.BackoffBase, Max: s.cfg.BackoffMax}
	lastBeat := time.Time{}
	var said wire.Heartbeat // what the last heartbeat sent
	for ctx.Err() == nil {
		var err error
		if h := s.heartbeatBody(); s.cfg.HeartbeatDue(time.Since(lastBeat), SameHeartbeat(h, &said)) {
			if _, err = s.sendHeartbeat(ctx, h); err == nil {
				lastBeat, said = time.Now(), *h
			}
		}
		start := time.Now()
		held := false
		if err == nil {
			held, err = s.pull(ctx)
		}
		var wait time.Duration
		switch {
		case err != nil:
			if ctx.Err() != nil {
				return
			}
			wait = s.failed("pull", err, &bo)
		case !held && time.Since(start) < s.cfg.PullWait/2:
			// Nothing came and the cloud did not hold the pull: poll.
			bo.Reset()
			wait = s.cfg.PullInterval
		default:
			bo.Reset()
		}
		if wait > 0 && !sleep(ctx, wait) {
			return
		}
	}
}

// pull fetches every page of cloud-side changes after the stored cursor,
// applies them and stores the new cursor (after applying: a crash in
// between re-applies a page, which the merge makes harmless). The first
// page is a long-poll (PullWait); held reports that a page brought
// something, or that the cloud held the pull.
func (s *Syncer) pull(ctx context.Context) (held bool, err error) {
	raw, err := s.deps.Store.SyncValue(keyPullCursor)
	if err != nil {
		return false, err
	}
	cursor := string(raw)
	// The last successful pull as recorded with the cursor, not the
	// in-memory last exchange: the heartbeat that precedes this pull has
	// just refreshed that one, which would hide how long the edge was away.
	lastRaw, err := s.deps.Store.SyncValue(keyLastSync)
	if err != nil {
		return false, err
	}
	var last int64
	if len(lastRaw) > 0 {
		_ = json.Unmarshal(lastRaw, &last)
	}
	if cursor != "" && last > 0 && s.cfg.Now().Sub(time.UnixMilli(last)) > s.cfg.MaxOffline {
		// Offline longer than the cloud keeps tombstones: deltas after the
		// old cursor could miss deletions, so re-pull everything.
		s.log.Warn("edge was offline longer than the maximum offline window; full resync", "last_pull", time.UnixMilli(last), "max_offline", s.cfg.MaxOffline)
		s.m.resyncs.Inc()
		cursor, s.have = "", wire.SetVersions{}
	}
	wait := s.cfg.PullWait
	for page := 0; page < 1000; page++ {
		sent := time.Now()
		p, err := s.deps.Client.PullSets(ctx, cursor, 1000, s.have, wait)
		var apiErr *client.APIError
		if errors.As(err, &apiErr) && apiErr.Status == 400 && cursor != "" {
			s.log.Warn("cloud refused the pull cursor; full resync", "err", err)
			s.m.resyncs.Inc()
			cursor, s.have = "", wire.SetVersions{}
			continue
		}
		if err != nil {
			return held, err
		}
		if len(p.Changes) > 0 || p.Versions != nil && *p.Versions != s.have || time.Since(sent) >= wait/2 {
			held = true
		}
		wait = 0 // only an empty first page is worth holding
		s.applyAlerts(ctx, p.Changes)
		if err := s.apply(p.Changes); err != nil {
			return held, err
		}
		if err := s.applySets(ctx, p); err != nil {
			return held, err
		}
		now := time.Now().UnixMilli()
		lastJSON, _ := json.Marshal(now)
		if err := s.deps.Store.SetSyncValues(map[string][]byte{keyPullCursor: []byte(p.NextCursor), keyLastSync: lastJSON}); err != nil {
			return held, err
		}
		s.succeeded()
		cursor = p.NextCursor
		if !p.More {
			return held, nil
		}
	}
	return held, nil
}

// applyAlerts merges the alerts the cloud changed (acks made there) into
// the edge's through the rule runner. One that cannot be merged (the edge
// no longer has it, or it does not decode) is logged and skipped: the
// pull must not stall on it, and the alert's own copy stays.
func (s *Syncer) applyAlerts(ctx context.Context, changes []wire.Change) {
	for i := range changes {
		c := &changes[i]
		if c.Kind != wire.KindAlert || s.deps.Rules == nil {
			continue
		}
		var a rules.Alert
		if err := json.Unmarshal(c.Alert, &a); err != nil {
			s.log.Warn("pulled alert does not decode; skipped", "device", c.Device, "err", err)
			continue
		}
		if _, err := s.deps.Rules.MergeRemote(ctx, a); err != nil {
			s.log.Warn("pulled alert not merged", "alert", a.ID, "err", err)
			continue
		}
		s.m.pulled.WithLabelValues(wire.KindAlert).Inc()
	}
}

// apply merges pulled changes and sends changed desired state downstream.
func (s *Syncer) apply(changes []wire.Change) error {
	if len(changes) == 0 {
		return nil
	}
	local := make([]store.Change, 0, len(changes))
	var revoked []*wire.Sessions
	for i := range changes {
		if changes[i].Kind == wire.KindSessions {
			if changes[i].Sessions != nil {
				revoked = append(revoked, changes[i].Sessions)
			}
			continue
		}
		if k := changes[i].Kind; k == wire.KindDesired || k == wire.KindReported {
			// The JSON rules on what the cloud sends, value by value, so a
			// value the cloud stored before them neither reaches a phone
			// nor stalls the pull (a refused page would be pulled again
			// and again).
			var n int
			if changes[i].Doc, n = wire.ScrubDoc(changes[i].Doc); n > 0 {
				s.log.Warn("pulled state values break the JSON rules; stored as null", "device", changes[i].Device, "kind", k, "values", n)
			}
		}
		if c, ok := fromWire(&changes[i]); ok {
			local = append(local, c)
		}
	}
	if err := s.revs.add(revoked); err != nil {
		return err
	}
	if len(revoked) > 0 {
		s.log.Info("learned session revocations from the cloud", "revocations", len(revoked))
	}
	applied, err := s.deps.Store.ApplyRemote(local)
	if err != nil {
		return err
	}
	dataChanged := false
	desired := map[string]*store.Device{} // the last state of each device whose desired state changed
	for _, a := range applied {
		s.m.rejected.Add(float64(a.Rejected))
		s.m.pulled.WithLabelValues(a.Change.Kind.String()).Inc()
		if !a.Changed {
			s.m.conflicts.Inc() // the local state already held a newer write
			continue
		}
		switch a.Change.Kind {
		case store.ChangeDesired:
			if a.Device != nil {
				desired[a.Device.ID] = a.Device
			}
		case store.ChangeMeta, store.ChangeUser:
			dataChanged = true
		}
	}
	for _, d := range desired {
		s.publishDesired(d)
	}
	if dataChanged && s.deps.DataChanged != nil {
		s.deps.DataChanged()
	}
	return nil
}

func (s *Syncer) publishDesired(d *store.Device) {
	if s.deps.Downlink == nil {
		return
	}
	payload, err := wire.DesiredPayload(d.Desired)
	if err == nil {
		err = s.deps.Downlink.Publish(wire.DesiredTopic(d.ID), payload, true, wire.DesiredQoS)
	}
	if err != nil {
		// Stored already; the device gets it with the next publish.
		s.log.Warn("desired-state downlink failed", "device", d.ID, "err", err)
	}
}

// applySets installs the sets a pull page carries: keys, policies,
// directory, whole (a cloud that does not version them) or those whose
// version moved, the directory as a delta. Each is cached on disk, with
// the sets' versions, before it takes effect.
func (s *Syncer) applySets(ctx context.Context, p *wire.PullPage) error {
	kv := map[string][]byte{}
	v := p.Versions
	keysIn := v == nil || v.Keys != s.have.Keys
	policiesIn := v == nil || v.Policies != s.have.Policies
	if keysIn && len(p.Keys) > 0 && s.deps.Keys != nil {
		old, _ := s.deps.Store.SyncValue(keyKeys)
		if string(old) != string(p.Keys) {
			var set auth.JWKS
			if err := json.Unmarshal(p.Keys, &set); err != nil {
				return fmt.Errorf("deployment keys: %w", err)
			}
			// SetTrusted persists the keys in the keyring's own file.
			if err := s.deps.Keys.SetTrusted(set); err != nil {
				return err
			}
			kv[keyKeys] = p.Keys
			s.log.Info("installed the deployment's public keys", "keys", len(set.Keys))
		}
	}
	if policiesIn && s.deps.Policies != nil {
		// The cloud's set replaces the edge's whole policy; an empty set
		// (the cloud distributes none, or deleted the last) means the
		// built-in policies, never the last set the cloud sent.
		digest := policyDigest(p.Policies)
		old, _ := s.deps.Store.SyncValue(keyPolicies)
		if string(old) != digest {
			var modules []policy.Module
			for _, m := range p.Policies {
				modules = append(modules, policy.Module{Name: m.Name, Source: m.Rego})
			}
			what := "the cloud's policies"
			if len(modules) == 0 {
				modules, what = s.deps.BuiltinPolicies, "the built-in policies (the cloud distributes none)"
			}
			switch err := s.installPolicies(ctx, modules); {
			case errors.Is(err, policy.ErrRejected):
				// Installing the same set again cannot help: record it
				// and wait for the cloud's next one.
				s.log.Error("the cloud's policies do not compile; the last good policy stays in force", "modules", len(modules), "err", err)
			case err != nil:
				return err
			default:
				s.log.Info("installed "+what, "modules", len(modules))
			}
			kv[keyPolicies] = []byte(digest)
		}
	}
	// Only a cloud that versions its sets distributes rules.
	if v != nil && v.Rules != s.have.Rules && s.deps.Rules != nil {
		if err := s.applyRules(ctx, p.Rules, kv); err != nil {
			return err
		}
	}
	dir := p.Edges
	if v != nil && p.Directory != nil {
		s.dirMu.RLock()
		dir = p.Directory.Apply(s.dir)
		s.dirMu.RUnlock()
	}
	if dir != nil {
		b, err := json.Marshal(dir)
		if err != nil {
			return err
		}
		kv[keyDirectory] = b
		s.dirMu.Lock()
		s.dir = dir
		s.dirMu.Unlock()
	}
	if v != nil && *v != s.have {
		b, err := json.Marshal(v)
		if err != nil {
			return err
		}
		kv[keyVersions] = b
	}
	if len(kv) == 0 {
		return nil
	}
	if err := s.deps.Store.SetSyncValues(kv); err != nil {
		return err
	}
	if v != nil {
		s.have = *v
	}
	return nil
}

// applyRules puts the cloud's rule set in force and, when it was, caches it
// (into kv) as the set the edge starts with. A set that does not decode or
// compile is refused whole: the last good set stays in force and cached,
// and the version is still recorded, so the same set is not retried until
// the cloud sends another.
func (s *Syncer) applyRules(ctx context.Context, raw []json.RawMessage, kv map[string][]byte) error {
	rs := make([]rules.Rule, 0, len(raw))
	var err error
	for _, b := range raw {
		var r rules.Rule
		if err = json.Unmarshal(b, &r); err != nil {
			err = fmt.Errorf("%w: %v", rules.ErrInvalid, err)
			break
		}
		rs = append(rs, r)
	}
	if err == nil {
		err = s.deps.Rules.SetCloud(ctx, rs)
	}
	switch {
	case errors.Is(err, rules.ErrInvalid):
		s.log.Error("the cloud's rules do not compile; the last good set stays in force", "rules", len(raw), "err", err)
		return nil
	case err != nil:
		return fmt.Errorf("cloud rules: %w", err)
	}
	b, err := json.Marshal(rs)
	if err != nil {
		return err
	}
	kv[keyRules] = b
	s.log.Info("installed the cloud's rules", "rules", len(rs))
	return nil
}

// installPolicies installs modules; with none (no built-in set was given)
// it leaves the policy in force.
func (s *Syncer) installPolicies(ctx context.Context, modules []policy.Module) error {
	if len(modules) == 0 {
		s.log.Warn("the cloud distributes no policies and no built-in set is configured; the policy in force stays")
		return nil
	}
	return s.deps.Policies.Install(ctx, modules)
}

// policyDigest identifies a distributed set; the empty set's is empty, as
// is the digest of an edge that never installed one, so an edge whose cloud
// never distributed policies installs nothing.
func policyDigest(ps []wire.Policy) string {
	sort.Slice(ps, func(i, j int) bool { return ps[i].Name < ps[j].Name })
	var b strings.Builder
	for _, p := range ps {
		fmt.Fprintf(&b, "%s\x00%d\x00%s\x00", p.Name, len(p.Rego), p.Rego)
	}
	return b.String()
}

// ---- directory ----

// Edges implements api.Directory with the directory last pulled from the
// cloud, which the API ranks with wire.Nearest, so phones find edges while
// this one is offline. Healthy is as the cloud saw it at that pull.
func (s *Syncer) Edges(context.Context) ([]wire.Edge, error) {
	s.dirMu.RLock()
	defer s.dirMu.RUnlock()
	return append([]wire.Edge(nil), s.dir...), nil
}
