// Package raftnode runs one member of the cloud's raft cluster: it wires
// hashicorp/raft (TCP transport, over mutual TLS when configured;
// raft-boltdb log and stable stores; file snapshots) to the state machine,
// group-commits concurrent proposals into single log entries, applies
// admission control, and manages membership.
//
// Timeouts are tuned for a LAN (see Config defaults): a follower notices a
// dead leader within 300–600 ms and an election takes a few round trips, so
// failover lands well under a second, while a leader that loses its quorum
// steps down within the lease timeout and can no longer acknowledge writes.
package raftnode

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"

	"github.com/outpost-edge/outpost/pkg/certs"
	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/hlc"
)

// Sentinel errors callers branch on.
var (
	// ErrNotLeader: this node cannot propose; forward to the leader.
	ErrNotLeader = errors.New("not the raft leader")
	// ErrUnknownOutcome: leadership was lost while the entry was in flight;
	// it may or may not commit. Callers retry idempotent writes.
	ErrUnknownOutcome = errors.New("leadership lost before commit; outcome unknown")
	// ErrOverloaded: the apply queue is full; try again later.
	ErrOverloaded = errors.New("apply queue full")
	// ErrConflict: a join names an id or address already used differently.
	ErrConflict = errors.New("membership conflict")
	// ErrNoSuchNode: a remove names a node that is not a member.
	ErrNoSuchNode = errors.New("no such node")
	// ErrStopped: the node is shutting down.
	ErrStopped = errors.New("raft node stopped")
)

// Config configures a node. Zero values take DefaultConfig's.
type Config struct {
	ID            string
	RaftBind      string
	RaftAdvertise string
	HTTPAdvertise string
	DataDir       string
	Bootstrap     bool

	HeartbeatTimeout time.Duration // default 300ms
	// LeaderHeartbeatTimeout is the heartbeat timeout this node runs with
	// while it leads (default twice HeartbeatTimeout). hashicorp/raft
	// uses one setting for two things: a follower's wait before it starts
	// an election, and, a tenth to a fifth of it, the interval of the
	// leader's heartbeats. Followers keep HeartbeatTimeout, so failover is
	// as quick; the leader heartbeats half as often, and heartbeats were
	// the largest part of an idle cluster's CPU (watchLoop).
	LeaderHeartbeatTimeout time.Duration
	ElectionTimeout        time.Duration // default 300ms
	LeaderLeaseTimeout     time.Duration // default 250ms
	CommitTimeout          time.Duration // default 250ms
	SnapshotInterval       time.Duration // default 30s
	SnapshotThreshold      uint64        // default 2048 entries
	TrailingLogs           uint64        // default 1024 entries

	// MaxEntryBytes caps a group-committed log entry (default 1 MiB).
	MaxEntryBytes int
	// MaxInflightEntries caps the entries proposed and not yet applied
	// (default 1). While that many are in flight, new proposals wait and
	// go out together in the next entry: the fewer in flight, the larger
	// the entries, and every entry costs a log fsync on each node and a
	// state transaction on each node. Once a sixteenth of MaxEntryBytes
	// (64 KiB by default) is waiting, the entry goes anyway: big writes
	// make big entries without help, and pipelining them keeps the log and
	// the state machine busy at once. On this project's 2-core benchmark 1
	// beat 2 and 16 (see README, Operations).
	MaxInflightEntries int
	// GroupCommitWait is how long, at most, an entry waits for more
	// proposals once it may go (default 4ms; negative disables). It waits
	// only when the previous entry held at least lingerSiblings proposals,
	// only until every edge that pushed in the previous entry has pushed
	// again, and only while proposals keep arriving, each within a quarter
	// of GroupCommitWait of the last. Under load, the writers answered by
	// one entry come back a few milliseconds later; without the wait they
	// would miss the next entry and the writers split into groups that
	// take turns, each entry half as full.
	GroupCommitWait time.Duration
	// MaxPendingBytes caps proposals queued or in flight (default 32
	// MiB): Admit admits no write past it (see admit.go).
	MaxPendingBytes int64
	// LogCacheBytes bounds the newest log entries kept in memory for
	// replication and apply (default 16 MiB; negative: none). See logCache.
	LogCacheBytes int
	// MaxQueueDelay bounds the apply queue by time as well: Admit keeps
	// it at most this long at the rate it drains (default 2s, and never
	// under four entries; negative: MaxPendingBytes only). A write's wait
	// in the queue must stay well under the callers' request timeout, or
	// its proposal expires there.
	MaxQueueDelay time.Duration
	// AdmitWait is the longest a write waits in Admit for room in the
	// queue (default 5s; negative: refuse at once); MaxWaitingBytes caps
	// the request bodies waiting (default MaxPendingBytes).
	AdmitWait       time.Duration
	MaxWaitingBytes int64
	// DialOverrides maps a peer's server id to the address this node dials
	// instead of the one in the raft configuration (split-horizon networks,
	// NAT, and the partition tests' per-link proxies).
	DialOverrides map[string]string
	// RaftLogLevel is hashicorp/raft's log level (default "warn").
	RaftLogLevel string
	// TLS, when set, is the cluster's mutual TLS: the transport accepts
	// only peers with a certificate from the cluster CA and dials with this
	// node's. nil is plain TCP (the daemon allows that on loopback only).
	TLS *certs.Cluster
}

// DefaultConfig is the one source of a node's defaults (the cloud daemon's
// configuration builds on it). Timeouts are tuned for a LAN: failover
// well under a second. CommitTimeout is how often (1-2x) an idle leader
// sends every follower an append only to tell it the commit index: at
// hashicorp/raft's 50ms those appends were a sixth of an idle leader's CPU,
// and all that waits on them is a follower's view of the last write before
// a pause (reads and edges' pulls are served by the leader; a pull a
// follower holds learns of a write up to 2x CommitTimeout late). Writes
// that keep coming carry the commit index anyway. Snapshots are
// checked every 30s and taken after 2048 entries, keeping 1024 for slow
// followers: entries are group commits of up to MaxEntryBytes, so 2048 of
// them can already be gigabytes of log, and a follower further behind is
// better served by the snapshot.
func DefaultConfig() Config {
	return Config{
		HeartbeatTimeout:   300 * time.Millisecond,
		ElectionTimeout:    300 * time.Millisecond,
		LeaderLeaseTimeout: 250 * time.Millisecond,
		CommitTimeout:      250 * time.Millisecond,
		SnapshotInterval:   30 * time.Second,
		SnapshotThreshold:  2048,
		TrailingLogs:       1024,
		MaxEntryBytes:      1 << 20,
		MaxInflightEntries: 1,
		GroupCommitWait:    4 * time.Millisecond,
		MaxPendingBytes:    32 << 20,
		LogCacheBytes:      16 << 20,
		MaxQueueDelay:      2 * time.Second,
		AdmitWait:          5 * time.Second,
		RaftLogLevel:       "warn",
	}
}

// defaults fills what c leaves zero from DefaultConfig.
func (c *Config) defaults() {
	d := DefaultConfig()
	set := func(dst *time.Duration, v time.Duration) {
		if *dst == 0 {
			*dst = v
		}
	}
	set(&c.HeartbeatTimeout, d.HeartbeatTimeout)
	set(&c.LeaderHeartbeatTimeout, 2*c.HeartbeatTimeout)
	set(&c.ElectionTimeout, d.ElectionTimeout)
	set(&c.LeaderLeaseTimeout, d.LeaderLeaseTimeout)
	set(&c.CommitTimeout, d.CommitTimeout)
	set(&c.SnapshotInterval, d.SnapshotInterval)
	set(&c.GroupCommitWait, d.GroupCommitWait)
	set(&c.MaxQueueDelay, d.MaxQueueDelay)
	set(&c.AdmitWait, d.AdmitWait)
	if c.SnapshotThreshold == 0 {
		c.SnapshotThreshold = d.SnapshotThreshold
	}
	if c.TrailingLogs == 0 {
		c.TrailingLogs = d.TrailingLogs
	}
	if c.MaxEntryBytes == 0 {
		c.MaxEntryBytes = d.MaxEntryBytes
	}
	if c.MaxPendingBytes == 0 {
		c.MaxPendingBytes = d.MaxPendingBytes
	}
	if c.LogCacheBytes == 0 {
		c.LogCacheBytes = d.LogCacheBytes
	}
	if c.MaxWaitingBytes == 0 {
		c.MaxWaitingBytes = c.MaxPendingBytes
	}
	if c.MaxInflightEntries <= 0 {
		c.MaxInflightEntries = d.MaxInflightEntries
	}
	if c.RaftLogLevel == "" {
		c.RaftLogLevel = d.RaftLogLevel
	}
}

// Node is a running cluster member.
type Node struct {
	cfg       Config
	log       *slog.Logger
	raft      *raft.Raft
	fsm       *fsm.FSM
	clock     *hlc.Clock
	transport *raft.NetworkTransport
	logStore  *raftboltdb.BoltStore
	metrics   *metrics

	proposals chan *proposal
	inflight  chan inflight
	slots     chan struct{} // one per entry proposed and not yet applied
	pending   atomic.Int64
	// queued is the size of proposals not yet packed into an entry; full
	// wakes the batcher when that reaches bigEntry.
	queued atomic.Int64
	full   chan struct{}
	// adm is the waiting room of Admit, rate the queue's drain rate and
	// expand the running mean ratio of a command's size to its request
	// body's: what Admit reserves for a write before it is decoded
	// (admit.go).
	adm    admission
	rate   drainRate
	expand atomic.Uint64 // float64 bits; 0: none seen

	observer *raft.Observer
	obsCh    chan raft.Observation
	hbMu     sync.Mutex
	failing  map[raft.ServerID]bool

	stopOnce sync.Once
	stop     chan struct{}
	wg       sync.WaitGroup
}

type proposal struct {
	cmd   []byte
	start time.Time
	done  chan outcome
	// state moves from queued to packed (the batcher put it in an entry)
	// or to abandoned (its proposer's context ended first: never proposed,
	// so its outcome is known).
	state atomic.Int32
	// writer identifies whoever proposes in sequence (an edge's pushes),
	// "" for anything else; the group commit waits for the writers of the
	// previous entry by it.
	writer string
}

const (
	propQueued int32 = iota
	propPacked
	propAbandoned
)

type outcome struct {
	res fsm.Result
	err error
}

type inflight struct {
	f     raft.ApplyFuture
	props []*proposal
	bytes int64
	slot  bool // holds one of n.slots
}

// New opens the stores, starts raft and, with Bootstrap on a fresh data
// directory, bootstraps a one-node cluster. Call Run to start proposing.
func New(cfg Config, f *fsm.FSM, clock *hlc.Clock, log *slog.Logger, reg prometheus.Registerer) (*Node, error) {
	cfg.defaults()
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("raft data dir: %w", err)
	}
	// raft logs through the daemon's slog logger: one stream, one format.
	hl := newHCLog(log, "raft", cfg.RaftLogLevel)

	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.ID)
	rc.HeartbeatTimeout = cfg.HeartbeatTimeout
	rc.ElectionTimeout = cfg.ElectionTimeout
	rc.LeaderLeaseTimeout = cfg.LeaderLeaseTimeout
	rc.CommitTimeout = cfg.CommitTimeout
	rc.SnapshotInterval = cfg.SnapshotInterval
	rc.SnapshotThreshold = cfg.SnapshotThreshold
	rc.TrailingLogs = cfg.TrailingLogs
	rc.MaxAppendEntries = 32 // entries are group commits of up to MaxEntryBytes
	// raft's go-metrics telemetry goes to no sink here (the node exports its
	// own Prometheus metrics); the legacy copies only cost a lookup per
	// heartbeat.
	rc.NoLegacyTelemetry = true
	// The state lives in bbolt with its applied index, so there is nothing to
	// restore on start; New restores explicitly only if the state file is
	// behind the newest snapshot (e.g. lost after a power failure).
	rc.NoSnapshotRestoreOnStart = true
	rc.Logger = hl
	if err := raft.ValidateConfig(rc); err != nil {
		return nil, fmt.Errorf("raft config: %w", err)
	}

	logStore, err := openLogStore(filepath.Join(cfg.DataDir, "raft.db"))
	if err != nil {
		return nil, fmt.Errorf("open raft log %s: %w (is another process using this data dir?)", cfg.DataDir, err)
	}
	snaps, err := raft.NewFileSnapshotStoreWithLogger(cfg.DataDir, 2, hl)
	if err != nil {
		_ = logStore.Close()
		return nil, fmt.Errorf("snapshot store: %w", err)
	}
	if err := catchUpFromSnapshot(f, snaps, log); err != nil {
		_ = logStore.Close()
		return nil, err
	}

	adv, err := net.ResolveTCPAddr("tcp", cfg.RaftAdvertise)
	if err != nil {
		_ = logStore.Close()
		return nil, fmt.Errorf("raft advertise address %q: %w", cfg.RaftAdvertise, err)
	}
	tc := &raft.NetworkTransportConfig{MaxPool: 4, Timeout: 10 * time.Second, Logger: hl}
	if len(cfg.DialOverrides) > 0 {
		tc.ServerAddressProvider = &dialer{overrides: cfg.DialOverrides, self: cfg.ID, selfAddr: cfg.RaftAdvertise, fsm: f}
	}
	transport, err := newTransport(cfg, adv, tc)
	if err != nil {
		_ = logStore.Close()
		return nil, fmt.Errorf("raft listen on %s: %w", cfg.RaftBind, err)
	}

	n := &Node{
		cfg: cfg, log: log, fsm: f, clock: clock, transport: transport, logStore: logStore,
		proposals: make(chan *proposal, 4096),
		inflight:  make(chan inflight, 64), // bounds big entries, which go without a slot
		slots:     make(chan struct{}, cfg.MaxInflightEntries),
		full:      make(chan struct{}, 1),
		failing:   map[raft.ServerID]bool{},
		stop:      make(chan struct{}),
		obsCh:     make(chan raft.Observation, 64),
	}
	existing, err := raft.HasExistingState(logStore, logStore, snaps)
	if err != nil {
		n.closeStores()
		return nil, fmt.Errorf("inspect raft state: %w", err)
	}
	var logs raft.LogStore = logStore
	if cfg.LogCacheBytes > 0 {
		logs = newLogCache(logStore, cfg.LogCacheBytes)
	}
	r, err := raft.NewRaft(rc, f, logs, logStore, snaps, transport)
	if err != nil {
		n.closeStores()
		return nil, fmt.Errorf("start raft: %w", err)
	}
	n.raft = r
	if cfg.Bootstrap && !existing {
		// The advertised address as configured (a stable DNS name in a
		// StatefulSet), not the transport's resolved IP, which changes when
		// the pod is rescheduled.
		bf := r.BootstrapCluster(raft.Configuration{Servers: []raft.Server{{
			Suffrage: raft.Voter, ID: rc.LocalID, Address: raft.ServerAddress(cfg.RaftAdvertise),
		}}})
		if err := bf.Error(); err != nil && !errors.Is(err, raft.ErrCantBootstrap) {
			_ = r.Shutdown().Error()
			n.closeStores()
			return nil, fmt.Errorf("bootstrap: %w", err)
		}
	}
	n.observer = raft.NewObserver(n.obsCh, false, func(o *raft.Observation) bool {
		switch o.Data.(type) {
		case raft.FailedHeartbeatObservation, raft.ResumedHeartbeatObservation, raft.LeaderObservation:
			return true
		}
		return false
	})
	r.RegisterObserver(n.observer)
	n.metrics = newMetrics(n, reg)
	return n, nil
}

// newTransport is raft's TCP transport, over mutual TLS when cfg.TLS is
// set.
func newTransport(cfg Config, adv net.Addr, tc *raft.NetworkTransportConfig) (*raft.NetworkTransport, error) {
	if cfg.TLS == nil {
		return raft.NewTCPTransportWithConfig(cfg.RaftBind, adv, tc)
	}
	stream, err := newTLSStream(cfg.RaftBind, adv, cfg.TLS.ServerConfig(), cfg.TLS.ClientConfig())
	if err != nil {
		return nil, err
	}
	tc.Stream = stream
	return raft.NewNetworkTransportWithConfig(tc), nil
}

// openLogStore opens the raft log and stable store: bbolt, fsynced on every
// append (two fdatasyncs per commit: pages, then meta).
func openLogStore(path string) (*raftboltdb.BoltStore, error) {
	return raftboltdb.New(raftboltdb.Options{
		Path:        path,
		BoltOptions: &bolt.Options{Timeout: 2 * time.Second, FreelistType: bolt.FreelistMapType, NoFreelistSync: true},
	})
}

// dialer resolves the address to dial for a peer: an override if one is
// configured, else the raft address recorded in the state (which equals the
// one in the raft configuration).
type dialer struct {
	overrides map[string]string
	self      string
	selfAddr  string
	fsm       *fsm.FSM
}

func (d *dialer) ServerAddr(id raft.ServerID) (raft.ServerAddress, error) {
	if a, ok := d.overrides[string(id)]; ok {
		return raft.ServerAddress(a), nil
	}
	if string(id) == d.self {
		return raft.ServerAddress(d.selfAddr), nil
	}
	if nodes, err := d.fsm.Nodes(); err == nil {
		if n, ok := nodes[string(id)]; ok && n.RaftAddr != "" {
			return raft.ServerAddress(n.RaftAddr), nil
		}
	}
	// raft falls back to the configuration's address.
	return "", fmt.Errorf("no dial address recorded for %s", id)
}

// catchUpFromSnapshot restores the newest snapshot into the state machine if
// the state file is behind it, because raft replays only the log after the
// snapshot and would otherwise leave a gap.
func catchUpFromSnapshot(f *fsm.FSM, snaps *raft.FileSnapshotStore, log *slog.Logger) error {
	list, err := snaps.List()
	if err != nil {
		return fmt.Errorf("list snapshots: %w", err)
	}
	if len(list) == 0 || list[0].Index <= f.AppliedIndex() {
		return nil
	}
	log.Warn("state behind newest snapshot; restoring", "applied", f.AppliedIndex(), "snapshot", list[0].Index)
	_, rc, err := snaps.Open(list[0].ID)
	if err != nil {
		return fmt.Errorf("open snapshot %s: %w", list[0].ID, err)
	}
	if err := f.Restore(rc); err != nil {
		return fmt.Errorf("restore snapshot %s: %w", list[0].ID, err)
	}
	return nil
}

func (n *Node) closeStores() {
	_ = n.transport.Close()
	_ = n.logStore.Close()
}

// Run runs the proposer and the leadership watcher until ctx ends.
func (n *Node) Run(ctx context.Context) {
	n.wg.Add(3)
	go func() { defer n.wg.Done(); n.batchLoop() }()
	go func() { defer n.wg.Done(); n.completeLoop() }()
	go func() { defer n.wg.Done(); n.watchLoop() }()
	select {
	case <-ctx.Done():
	case <-n.stop:
	}
}

// Shutdown stops raft and closes the stores. Safe to call more than once.
func (n *Node) Shutdown() error {
	var err error
	n.stopOnce.Do(func() {
		close(n.stop)
		n.raft.DeregisterObserver(n.observer)
		err = n.raft.Shutdown().Error()
		n.wg.Wait()
		if e := n.transport.Close(); e != nil && err == nil {
			err = e
		}
		if e := n.logStore.Close(); e != nil && err == nil {
			err = e
		}
	})
	return err
}

// IsLeader reports whether this node is the leader.
func (n *Node) IsLeader() bool { return n.raft.State() == raft.Leader }

// Leader returns the leader's id and HTTP address as this node knows them.
func (n *Node) Leader() (id, httpAddr string, ok bool) {
	_, lid := n.raft.LeaderWithID()
	if lid == "" {
		return "", "", false
	}
	if string(lid) == n.cfg.ID {
		return n.cfg.ID, n.cfg.HTTPAdvertise, true
	}
	nodes, err := n.fsm.Nodes()
	if err != nil {
		return string(lid), "", false
	}
	nd, found := nodes[string(lid)]
	return string(lid), nd.HTTPAddr, found && nd.HTTPAddr != ""
}

// PendingBytes is the size of proposals queued or in flight.
func (n *Node) PendingBytes() int64 { return n.pending.Load() }

// Propose replicates one command and returns its result once applied on
// this node. Concurrent proposals are committed together.
func (n *Node) Propose(ctx context.Context, c *fsm.Command) (fsm.Result, error) {
	return n.ProposeOrdered(ctx, c, nil)
}

// ProposeOrdered is Propose with a callback run as soon as the command has
// its place in the proposal queue: every proposal queued after that point
// is applied after it. Callers use it to let a successor go ahead without
// waiting for the whole commit (an edge's pipelined pushes).
func (n *Node) ProposeOrdered(ctx context.Context, c *fsm.Command, onQueued func()) (fsm.Result, error) {
	if !n.IsLeader() {
		return fsm.Result{}, ErrNotLeader
	}
	b, err := fsm.EncodeCommand(c)
	if err != nil {
		return fsm.Result{}, err
	}
	p := &proposal{cmd: b, start: time.Now(), done: make(chan outcome, 1)}
	queued := n.queued.Add(int64(len(b)))
	if c.Type == fsm.CmdPush && c.Push != nil {
		p.writer = c.Push.Edge
	}
	n.pending.Add(int64(len(b)))
	n.takeReservation(ctx, len(b)) // the command's own size counts now
	select {
	case n.proposals <- p:
		if queued >= n.bigEntry() {
			select {
			case n.full <- struct{}{}:
			default:
			}
		}
		if onQueued != nil {
			onQueued()
		}
	case <-ctx.Done():
		n.unqueue(len(b))
		return fsm.Result{}, ctx.Err()
	case <-n.stop:
		n.unqueue(len(b))
		return fsm.Result{}, ErrStopped
	}
	select {
	case o := <-p.done:
		return o.res, o.err
	case <-ctx.Done():
		if p.state.CompareAndSwap(propQueued, propAbandoned) {
			// Still waiting in the queue: the batcher will skip it, so it
			// is known not to apply.
			n.unqueue(len(b))
			return fsm.Result{}, &OverloadError{RetryAfter: n.retryAfter(int64(len(b))), cause: ctx.Err(),
				Reason: "the request's deadline passed while the write waited in the apply queue; it was not applied"}
		}
		// The entry may still commit; idempotent callers retry safely.
		return fsm.Result{}, fmt.Errorf("%w: %w", ErrUnknownOutcome, ctx.Err())
	case <-n.stop:
		return fsm.Result{}, ErrStopped
	}
}

// unqueue takes back a proposal of size bytes that will not be packed.
func (n *Node) unqueue(size int) {
	n.pending.Add(-int64(size))
	n.queued.Add(-int64(size))
	n.admitNext()
}

// lingerSiblings is how many proposals the previous entry must have held
// for the next to wait for stragglers (GroupCommitWait): below it the
// cluster is not busy enough for waiting to pay.
const lingerSiblings = 8

// batchLoop is the group commit: it takes every proposal waiting at the
// moment raft can accept another entry and packs them into that entry. Under
// load entries grow (and wait briefly for more, see GroupCommitWait); when
// idle a lone proposal goes out at once.
func (n *Node) batchLoop() {
	linger := time.NewTimer(time.Hour)
	linger.Stop()
	prev := 0                    // proposals in the previous entry
	writers := map[string]bool{} // its writers; true once back
	for {
		var first *proposal
		select {
		case first = <-n.proposals:
		case <-n.stop:
			return
		}
		// Wait for a free slot before draining: while every slot is taken,
		// proposals pile up and go out together in the next entry. Big
		// writes need no help to make big entries, so once a sixteenth of an
		// entry is waiting it goes without a slot and the log pipelines.
		slot, ok := n.awaitSlot()
		if !ok {
			return
		}
		var props []*proposal
		size := pack(&props, 0, first)
	drain:
		for size < n.cfg.MaxEntryBytes {
			select {
			case p := <-n.proposals:
				size = pack(&props, size, p)
			default:
				break drain
			}
		}
		if n.cfg.GroupCommitWait > 0 && prev >= lingerSiblings && len(props) > 0 {
			props, size = n.gather(props, size, writers, linger)
		}
		if len(props) == 0 { // every one abandoned while it waited
			if slot {
				<-n.slots
			}
			continue
		}
		prev = len(props)
		clear(writers)
		cmds := make([][]byte, len(props))
		for i, p := range props {
			cmds[i] = p.cmd
			if p.writer != "" {
				writers[p.writer] = false
			}
		}
		n.queued.Add(-int64(size))
		data := fsm.EncodeEntry(cmds)
		for _, p := range props {
			p.cmd = nil // the entry holds a copy: keep the queue's memory single
		}
		f := n.raft.Apply(data, 0)
		n.metrics.entryCommands.Observe(float64(len(props)))
		n.metrics.entryBytes.Observe(float64(size))
		select {
		case n.inflight <- inflight{f: f, props: props, bytes: int64(size), slot: slot}:
		case <-n.stop:
			return
		}
	}
}

// pack adds p to props unless its proposer abandoned it, and returns the
// entry's size with it.
func pack(props *[]*proposal, size int, p *proposal) int {
	if !p.state.CompareAndSwap(propQueued, propPacked) {
		return size
	}
	*props = append(*props, p)
	return size + len(p.cmd)
}

// bigEntry is the queued size past which an entry goes without waiting for
// a slot.
func (n *Node) bigEntry() int64 { return int64(n.cfg.MaxEntryBytes / 16) }

// awaitSlot waits for a free in-flight slot (slot true), or for bigEntry of
// proposals to be queued (slot false). ok is false when the node stops.
func (n *Node) awaitSlot() (slot, ok bool) {
	for n.queued.Load() < n.bigEntry() {
		select {
		case n.slots <- struct{}{}:
			return true, true
		case <-n.full:
		case <-n.stop:
			return false, false
		}
	}
	return false, true
}

// gather adds proposals to props for as long as they keep arriving within a
// quarter of GroupCommitWait of each other, up to GroupCommitWait in all,
// until the entry is full, or until every writer of the previous entry
// (writers) is back.
func (n *Node) gather(props []*proposal, size int, writers map[string]bool, t *time.Timer) ([]*proposal, int) {
	missing := len(writers)
	back := func(p *proposal) {
		if seen, ok := writers[p.writer]; ok && !seen {
			writers[p.writer] = true
			missing--
		}
	}
	for _, p := range props {
		back(p)
	}
	gap := n.cfg.GroupCommitWait / 4
	deadline := time.Now().Add(n.cfg.GroupCommitWait)
	t.Reset(gap)
	defer t.Stop()
	for size < n.cfg.MaxEntryBytes && (missing > 0 || len(writers) == 0) {
		select {
		case p := <-n.proposals:
			if size = pack(&props, size, p); props[len(props)-1] == p {
				back(p)
			}
			left := time.Until(deadline)
			if left <= 0 {
				return props, size
			}
			t.Reset(min(gap, left))
		case <-t.C:
			return props, size
		case <-n.stop:
			return props, size
		}
	}
	return props, size
}

// completeLoop hands each committed entry's results to its proposers.
// Futures complete in log order, so waiting on them in order costs nothing.
func (n *Node) completeLoop() {
	for {
		var it inflight
		select {
		case it = <-n.inflight:
		case <-n.stop:
			return
		}
		err := n.await(it.f)
		if err == errAwaitStopped {
			return // the proposers see n.stop themselves
		}
		var results []fsm.Result
		if err == nil {
			results, _ = it.f.Response().([]fsm.Result)
		}
		now := time.Now()
		for i, p := range it.props {
			o := outcome{err: mapApplyErr(err)}
			if err == nil {
				if i < len(results) {
					o.res = results[i]
				} else {
					o.err = fmt.Errorf("raft entry %d: no result for command %d", it.f.Index(), i)
				}
			}
			n.metrics.applySeconds.Observe(now.Sub(p.start).Seconds())
			p.done <- o
		}
		if it.slot {
			<-n.slots
		}
		n.pending.Add(-it.bytes)
		n.rate.observe(it.bytes, now)
		n.admitNext()
	}
}

// await is f.Error(), or errAwaitStopped once the node stops first: raft never
// answers a future whose entry it had committed and handed to the state
// machine when it shut down, so waiting on Error alone could hold Shutdown
// (which waits for the goroutines that call this) forever. On that path the
// helper goroutine stays blocked; the node is gone by then.
func (n *Node) await(f raft.Future) error {
	done := make(chan error, 1)
	go func() { done <- f.Error() }()
	select {
	case err := <-done:
		return err
	case <-n.stop:
		select {
		case err := <-done:
			return err
		default:
			return errAwaitStopped
		}
	}
}

// errAwaitStopped: await gave up on a future because the node stopped.
var errAwaitStopped = errors.New("raft node stopped before the future was answered")

func mapApplyErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, raft.ErrNotLeader), errors.Is(err, raft.ErrLeadershipTransferInProgress):
		return ErrNotLeader
	case errors.Is(err, raft.ErrLeadershipLost):
		return ErrUnknownOutcome
	case errors.Is(err, raft.ErrRaftShutdown):
		return ErrStopped
	}
	return fmt.Errorf("raft apply: %w", err)
}

// watchLoop reacts to leadership changes and tracks which followers the
// leader cannot reach, for the status endpoint. It gives raft
// LeaderHeartbeatTimeout while this node leads and HeartbeatTimeout
// otherwise, from raft's leader channel: that always delivers the latest
// transition, where observations drop when the observer is behind, and a
// node that lost leadership must not keep the leader's longer timeout as
// a follower.
func (n *Node) watchLoop() {
	for {
		select {
		case <-n.stop:
			return
		case leading := <-n.raft.LeaderCh():
			rc := n.cfg.timeouts(n.raft.ReloadableConfig(), leading)
			if err := n.raft.ReloadConfig(rc); err != nil {
				n.log.Warn("setting the raft heartbeat timeout failed", "leading", leading, "heartbeat_timeout", rc.HeartbeatTimeout, "err", err)
			}
		case o := <-n.obsCh:
			switch d := o.Data.(type) {
			case raft.FailedHeartbeatObservation:
				n.hbMu.Lock()
				n.failing[d.PeerID] = true
				n.hbMu.Unlock()
			case raft.ResumedHeartbeatObservation:
				n.hbMu.Lock()
				delete(n.failing, d.PeerID)
				n.hbMu.Unlock()
			case raft.LeaderObservation:
				n.metrics.leaderChanges.Inc()
				n.hbMu.Lock()
				clear(n.failing)
				n.hbMu.Unlock()
				if string(d.LeaderID) == n.cfg.ID {
					n.wg.Add(1)
					go func() { defer n.wg.Done(); n.onLeader() }()
				}
			}
		}
	}
}

// timeouts is rc with the heartbeat and election timeouts of a node that
// leads or does not.
func (c Config) timeouts(rc raft.ReloadableConfig, leading bool) raft.ReloadableConfig {
	rc.HeartbeatTimeout, rc.ElectionTimeout = c.HeartbeatTimeout, c.ElectionTimeout
	if leading {
		// raft wants ElectionTimeout ≥ HeartbeatTimeout; a leader only
		// uses it to bound a leadership transfer.
		rc.HeartbeatTimeout = c.LeaderHeartbeatTimeout
		rc.ElectionTimeout = max(c.ElectionTimeout, c.LeaderHeartbeatTimeout)
	}
	return rc
}

// onLeader runs when this node wins an election: it raises the HLC past
// every stamp in the state (so its stamps win over older writes, whatever
// its wall clock says) and makes sure its own addresses are in the state.
func (n *Node) onLeader() {
	n.clock.Restore(n.fsm.MaxStamp())
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	go func() {
		select {
		case <-n.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	// The state may lag the log right after election; a barrier applies
	// everything committed before reading it.
	if err := n.await(n.raft.Barrier(5 * time.Second)); err != nil {
		return
	}
	n.clock.Restore(n.fsm.MaxStamp())
	nodes, err := n.fsm.Nodes()
	if err != nil {
		return
	}
	self := fsm.Node{ID: n.cfg.ID, RaftAddr: n.cfg.RaftAdvertise, HTTPAddr: n.cfg.HTTPAdvertise}
	if nodes[n.cfg.ID] == self {
		return
	}
	if _, err := n.Propose(ctx, &fsm.Command{Type: fsm.CmdNodeUpsert, AtMs: time.Now().UnixMilli(), Node: &self}); err != nil {
		n.log.Warn("record own addresses", "err", err)
	}
}

// Barrier waits until this leader has applied everything committed before
// the call: a leader-confirmed point for strong reads.
func (n *Node) Barrier(ctx context.Context) error {
	if !n.IsLeader() {
		return ErrNotLeader
	}
	timeout := 5 * time.Second
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
	}
	return mapApplyErr(n.raft.Barrier(timeout).Error())
}

// Snapshot asks raft to take a snapshot now.
func (n *Node) Snapshot() error {
	if err := n.raft.Snapshot().Error(); err != nil && !errors.Is(err, raft.ErrNothingNewToSnapshot) {
		return fmt.Errorf("snapshot: %w", err)
	}
	return nil
}

// Join adds a voter (leader only) and records its addresses. Repeating a
// join with the same id and addresses is a no-op success.
func (n *Node) Join(ctx context.Context, id, raftAddr, httpAddr string) error {
	if !n.IsLeader() {
		return ErrNotLeader
	}
	cf := n.raft.GetConfiguration()
	if err := cf.Error(); err != nil {
		return mapApplyErr(err)
	}
	member := false
	for _, s := range cf.Configuration().Servers {
		switch {
		case s.ID == raft.ServerID(id) && s.Address == raft.ServerAddress(raftAddr):
			member = true
		case s.ID == raft.ServerID(id):
			return fmt.Errorf("%w: node %q is already a member at raft address %s; remove it first", ErrConflict, id, s.Address)
		case s.Address == raft.ServerAddress(raftAddr):
			return fmt.Errorf("%w: raft address %s already belongs to node %q", ErrConflict, raftAddr, s.ID)
		}
	}
	if !member {
		if err := n.raft.AddVoter(raft.ServerID(id), raft.ServerAddress(raftAddr), 0, 10*time.Second).Error(); err != nil {
			return mapApplyErr(err)
		}
		n.log.Info("member joined", "member", id, "raft", raftAddr, "http", httpAddr)
	}
	_, err := n.Propose(ctx, &fsm.Command{Type: fsm.CmdNodeUpsert, AtMs: time.Now().UnixMilli(),
		Node: &fsm.Node{ID: id, RaftAddr: raftAddr, HTTPAddr: httpAddr}})
	return err
}

// Remove removes a member (leader only).
func (n *Node) Remove(ctx context.Context, id string) error {
	if !n.IsLeader() {
		return ErrNotLeader
	}
	cf := n.raft.GetConfiguration()
	if err := cf.Error(); err != nil {
		return mapApplyErr(err)
	}
	found := false
	for _, s := range cf.Configuration().Servers {
		found = found || s.ID == raft.ServerID(id)
	}
	if !found {
		return fmt.Errorf("%w: %q", ErrNoSuchNode, id)
	}
	// Forget the addresses first, while this node is surely still leader
	// (removing itself makes it step down).
	if _, err := n.Propose(ctx, &fsm.Command{Type: fsm.CmdNodeRemove, AtMs: time.Now().UnixMilli(), NodeID: id}); err != nil {
		return err
	}
	if err := n.raft.RemoveServer(raft.ServerID(id), 0, 10*time.Second).Error(); err != nil {
		return mapApplyErr(err)
	}
	n.log.Info("member removed", "member", id)
	return nil
}

// NodeStatus is one member in Status.
type NodeStatus struct {
	ID       string `json:"id"`
	RaftAddr string `json:"raft_addr"`
	HTTPAddr string `json:"http_addr"`
	Suffrage string `json:"suffrage"`
	// State is "leader", "follower", "unreachable" (the leader's heartbeats
	// to it are failing; only known when asking the leader) or this node's
	// own raft state.
	State string `json:"state"`
}

// Status is the cluster as this node sees it.
type Status struct {
	ID           string       `json:"id"`
	Leader       string       `json:"leader"`
	Term         uint64       `json:"term"`
	AppliedIndex uint64       `json:"applied_index"`
	CommitIndex  uint64       `json:"commit_index"`
	State        string       `json:"state"`
	Nodes        []NodeStatus `json:"nodes"`
}

// Status reports leader, term, indexes and members.
func (n *Node) Status() (Status, error) {
	_, lid := n.raft.LeaderWithID()
	st := Status{
		ID: n.cfg.ID, Leader: string(lid), Term: n.raft.CurrentTerm(),
		AppliedIndex: n.fsm.AppliedIndex(), CommitIndex: n.raft.CommitIndex(),
		State: stateName(n.raft.State()), Nodes: []NodeStatus{},
	}
	cf := n.raft.GetConfiguration()
	if err := cf.Error(); err != nil {
		return st, fmt.Errorf("raft configuration: %w", err)
	}
	addrs, err := n.fsm.Nodes()
	if err != nil {
		return st, err
	}
	leader := n.IsLeader()
	n.hbMu.Lock()
	defer n.hbMu.Unlock()
	for _, s := range cf.Configuration().Servers {
		ns := NodeStatus{ID: string(s.ID), RaftAddr: string(s.Address), HTTPAddr: addrs[string(s.ID)].HTTPAddr,
			Suffrage: s.Suffrage.String(), State: "follower"}
		switch {
		case s.ID == lid:
			ns.State = "leader"
		case string(s.ID) == n.cfg.ID:
			ns.State = st.State
		case leader && n.failing[s.ID]:
			ns.State = "unreachable"
		}
		if s.Suffrage == raft.Nonvoter {
			ns.Suffrage = "nonvoter"
		} else if s.Suffrage == raft.Voter {
			ns.Suffrage = "voter"
		}
		st.Nodes = append(st.Nodes, ns)
	}
	return st, nil
}

func stateName(s raft.RaftState) string {
	switch s {
	case raft.Leader:
		return "leader"
	case raft.Follower:
		return "follower"
	case raft.Candidate:
		return "candidate"
	}
	return "shutdown"
}

type metrics struct {
	applySeconds  prometheus.Histogram
	entryCommands prometheus.Histogram
	entryBytes    prometheus.Histogram
	leaderChanges prometheus.Counter
	admissions    *prometheus.CounterVec
	admitWait     prometheus.Histogram
}

func newMetrics(n *Node, reg prometheus.Registerer) *metrics {
	m := &metrics{
		applySeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "outpost_raft_apply_duration_seconds", Help: "Time from proposal to applied result on the leader.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}),
		entryCommands: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "outpost_raft_entry_commands", Help: "Commands group-committed per raft entry.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 12)}),
		entryBytes: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "outpost_raft_entry_bytes", Help: "Size of group-committed raft entries.",
			Buckets: prometheus.ExponentialBuckets(256, 4, 9)}),
		leaderChanges: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "outpost_raft_leader_changes_total", Help: "Leader changes this node observed (including losing the leader)."}),
		admissions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outpost_raft_admissions_total",
			Help: "Writes that waited for room in the apply queue (waited), or were refused at once (refused) or after the admission wait (timed_out); writes admitted at once are not counted."},
			[]string{"outcome"}),
		admitWait: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "outpost_raft_admit_wait_duration_seconds", Help: "How long admitted writes waited for room in the apply queue.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14)}),
	}
	if reg == nil {
		return m
	}
	reg.MustRegister(m.applySeconds, m.entryCommands, m.entryBytes, m.leaderChanges, m.admissions, m.admitWait,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "outpost_raft_state",
			Help: "Raft state: 0 follower, 1 candidate, 2 leader, 3 shutdown."},
			func() float64 { return float64(n.raft.State()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "outpost_raft_leader", Help: "1 if this node is the leader."},
			func() float64 {
				if n.IsLeader() {
					return 1
				}
				return 0
			}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "outpost_raft_term", Help: "Current raft term."},
			func() float64 { return float64(n.raft.CurrentTerm()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "outpost_raft_commit_index", Help: "Raft commit index."},
			func() float64 { return float64(n.raft.CommitIndex()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "outpost_raft_applied_index", Help: "Last raft index applied to the state."},
			func() float64 { return float64(n.fsm.AppliedIndex()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "outpost_raft_pending_bytes", Help: "Proposals queued or in flight (admission control input)."},
			func() float64 { return float64(n.pending.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "outpost_raft_queue_limit_bytes",
			Help: "What the apply queue may hold now: MaxQueueDelay at the drain rate, within MaxPendingBytes."},
			func() float64 { return float64(n.queueLimit()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "outpost_raft_drain_bytes_per_second",
			Help: "How fast the apply queue drains while busy (admission control input)."},
			func() float64 { return n.rate.bytesPerSec() }),
	)
	return m
}
