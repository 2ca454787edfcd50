// Package service is cloud-sync's application layer: the rules between the
// HTTP transport (package httpapi) and the replicated state (raftnode and
// fsm). It owns users' sessions and the deployment signing key, the per-edge
// push sequencing gate, the HLC stamp policy, cluster membership, and the
// consumer reads and writes.
//
// Every write runs on the raft leader: a method that needs the leader
// returns ErrNotLeader on a follower, and the caller (httpapi) forwards the
// request. The service stamps commands (HLC and wall time) before proposing
// them, so the state machine's Apply stays deterministic. Callers branch on
// the sentinel errors below with errors.Is, never on message text.
package service

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/cloud/raftnode"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/wechat"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Log is the replicated log as the service uses it; *raftnode.Node
// satisfies it.
type Log interface {
	IsLeader() bool
	Leader() (id, httpAddr string, ok bool)
	// Admit admits a write of size body bytes from writer (an edge) into
	// the apply queue, waiting a bounded time for room; the returned
	// context carries its reservation to Propose, and release ends it
	// (raftnode.Admit).
	Admit(ctx context.Context, writer string, size int) (context.Context, func(), error)
	Propose(ctx context.Context, c *fsm.Command) (fsm.Result, error)
	// ProposeOrdered calls onQueued once c has its place in the log order.
	ProposeOrdered(ctx context.Context, c *fsm.Command, onQueued func()) (fsm.Result, error)
	Barrier(ctx context.Context) error
}

// Cluster is raft membership; *raftnode.Node satisfies it.
type Cluster interface {
	Join(ctx context.Context, id, raftAddr, httpAddr string) error
	Remove(ctx context.Context, id string) error
	Status() (raftnode.Status, error)
	Snapshot() error
}

// Raft is the raft node: log and membership.
type Raft interface {
	Log
	Cluster
}

// Queries is the state machine's read side for sync and the consumer API;
// *fsm.FSM satisfies it.
type Queries interface {
	AppliedIndex() uint64
	EdgeSeq(edge string) uint64
	GetDevice(id string) (*fsm.Device, error)
	Readings(q fsm.ReadingsQuery) ([]fsm.StoredReading, string, error)
	Edges() ([]wire.Edge, error)
	Policies() ([]wire.Policy, error)
	Edge(id string) (wire.Edge, error)
	Rules() ([]fsm.RuleRecord, error)
	Alerts(q fsm.AlertsQuery) ([]fsm.AlertRecord, error)
	Alert(id string) (fsm.AlertRecord, error)
	Notifications(limit int) ([]fsm.Notification, error)
	Pull(edge, cursor string, limit int) (wire.PullPage, error)
	// PullWatch is closed when something a pull of edge carries commits.
	PullWatch(edge string) <-chan struct{}
	// PullPosition is the pull position recorded for edge ("" if none).
	PullPosition(edge string) string
	// EdgesIndex and SetsIndex grow when directory records, and policies,
	// rules or the signing key, may have changed.
	EdgesIndex() uint64
	SetsIndex() uint64
	// CheckResend verifies that a push at or below the edge's acknowledged
	// sequence repeats what was applied (fsm.ErrSeqConflict if not).
	CheckResend(edge string, first uint64, digests []wire.Digest) error
	Export(cursor string, limit int, emit func(*fsm.ExportRecord) error) (string, error)
}

// Identities is the state machine's read side for users and sessions;
// *fsm.FSM satisfies it.
type Identities interface {
	GetUser(openid string) (*wire.User, error)
	SigningKey() (*fsm.SigningKey, error)
	Session(family string) (fsm.SessionState, error)
	SessionsRevokedBefore(openid string) int64
}

// State is the replicated state machine, read locally.
type State interface {
	Queries
	Identities
}

// CodeExchanger turns a mini-program login code into the user's session
// (WeChat's code2session); *wechat.Client satisfies it.
type CodeExchanger interface {
	Code2Session(ctx context.Context, code string) (wechat.Session, error)
}

// Status is the cluster as this node sees it.
type Status = raftnode.Status

// Config configures the service. Zero values take the defaults noted.
type Config struct {
	// HeartbeatFresh is how recent an edge's heartbeat (or pull) must be
	// for the directory to call it healthy (default 90s).
	HeartbeatFresh time.Duration
	// PullHold is the longest an empty pull is held (default 25s; the edge
	// asks for at most wire.MaxPullWait).
	PullHold time.Duration
	// PullAckInterval is how often the leader records the pull positions
	// it observed, in one raft entry and only when one moved (default 5s).
	PullAckInterval time.Duration
	// LivenessInterval is how often the directory's health is recomputed
	// and held pulls are woken for directory changes (default 1s).
	LivenessInterval time.Duration
	// RequestTimeout bounds one proposal (default 10s).
	RequestTimeout time.Duration
	// WeChat exchanges login codes; nil: no WeChat login configured.
	WeChat CodeExchanger
	// Notifier sends alert notifications (RunNotify); nil: none are sent
	// (they stay queued).
	Notifier Notifier
	// DevLogin accepts "dev:<openid>" codes (development only).
	DevLogin bool
	// Admins are openids that get the admin role.
	Admins []string
	// Token lifetimes of users' sessions (the auth package's defaults).
	AccessTTL  time.Duration
	RefreshTTL time.Duration
	// RefreshReuseGrace: a refresh retried with the same token this soon
	// gets the same pair (sessions.go); default
	// auth.DefaultRefreshReuseGrace, negative disables.
	RefreshReuseGrace time.Duration
	// Now is the wall clock (default time.Now).
	Now func() time.Time
	// MaxOffline bounds how old a change an edge syncs may be and still be
	// accepted on its original proof (default 30 days, the edges' default
	// max_offline).
	MaxOffline time.Duration
	// Retention is how long readings are kept, by reading time (default
	// 720h). LogRetention is how long export-log entries are kept once
	// every sink in Sinks took them (default 168h). Tombstones are kept
	// for MaxOffline. See RunRetention.
	Retention    time.Duration
	LogRetention time.Duration
	// Sinks names the configured export sinks: the log keeps what any of
	// them has not taken (its cursor in the sink_cursor bucket).
	Sinks []string
	// Proofs and Authorizer override the deployment key and the
	// distributed policies in edge restriction (tests); nil: those.
	Proofs     ProofVerifier
	Authorizer Authorizer
}

// Service is one node's application layer. It is safe for concurrent use.
type Service struct {
	cfg    Config
	log    *slog.Logger
	raft   Raft
	state  State
	clock  *hlc.Clock
	stamps StampPolicy
	gate   *seqGate
	keys   keyCache
	pol    policyCache
	m      *metrics
	// policyMu serialises PutPolicy's check and proposal.
	policyMu sync.Mutex
	// live is the soft state of edges and the directory (liveness.go).
	live *liveness
	// setsMu guards pullSets, the cached policies, keys and rules pulls carry.
	setsMu   sync.Mutex
	pullSets *pullSets
}

// New builds the service over a raft node and its state machine. clock is
// the node's HLC, shared with raftnode (which restores it on leadership).
func New(cfg Config, r Raft, st State, clock *hlc.Clock, log *slog.Logger, reg prometheus.Registerer) *Service {
	if cfg.HeartbeatFresh == 0 {
		cfg.HeartbeatFresh = 90 * time.Second
	}
	if cfg.RequestTimeout == 0 {
		cfg.RequestTimeout = 10 * time.Second
	}
	if cfg.PullHold == 0 {
		cfg.PullHold = wire.MaxPullWait
	}
	if cfg.PullAckInterval == 0 {
		cfg.PullAckInterval = 5 * time.Second
	}
	if cfg.LivenessInterval == 0 {
		cfg.LivenessInterval = time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.MaxOffline == 0 {
		cfg.MaxOffline = 30 * 24 * time.Hour
	}
	if cfg.Retention == 0 {
		cfg.Retention = 30 * 24 * time.Hour
	}
	if cfg.LogRetention == 0 {
		cfg.LogRetention = 7 * 24 * time.Hour
	}
	return &Service{cfg: cfg, log: log, raft: r, state: st, clock: clock,
		stamps: StampPolicy{Clock: clock}, gate: newSeqGate(), m: newMetrics(reg), live: newLiveness()}
}

// Sentinel errors callers branch on. Errors from the layers below keep their
// text and chain and match one of these too.
var (
	// ErrNotLeader: this node cannot write; run the call on the leader.
	ErrNotLeader = errors.New("not the raft leader")
	// ErrOverloaded: the apply queue is full, or a write waited in it past
	// its deadline (then it was not applied); retry after the delay an
	// *OverloadedError gives.
	ErrOverloaded = errors.New("apply queue full")
	// ErrUnknownOutcome: leadership changed (or the proposal timed out)
	// before the write committed; it may or may not apply. Writes are
	// idempotent, so retry.
	ErrUnknownOutcome = errors.New("write outcome unknown")
	// ErrNotFound: no such device or user.
	ErrNotFound = errors.New("not found")
	// ErrBadCursor: a pull, readings or export cursor this API did not issue.
	ErrBadCursor = errors.New("bad cursor")
	// ErrCompacted: an export cursor before the oldest change still kept
	// (retention deleted what follows it); the error chain holds an
	// *fsm.CompactedError naming the earliest available cursor.
	ErrCompacted = errors.New("export cursor compacted")
	// ErrWrongEdge: a batch names an edge other than the caller's.
	ErrWrongEdge = errors.New("batch belongs to another edge")
	// ErrSeqGap: a push starts beyond the next sequence the cloud expects;
	// the error is a *SeqGapError.
	ErrSeqGap = errors.New("sequence gap")
	// ErrSeqConflict: a push re-sends sequence numbers already applied
	// with other content (sequence squatting); the error is a
	// *SeqConflictError.
	ErrSeqConflict = errors.New("sequence already applied with different content")
	// ErrConflict: a join names an id or address already used differently.
	ErrConflict = errors.New("membership conflict")
	// ErrNoSuchNode: a remove names a node that is not a member.
	ErrNoSuchNode = errors.New("no such node")
)

// Validation errors from the service match wire.ErrInvalid.

// SeqGapError is a push refused for a gap in the edge's sequence.
type SeqGapError struct {
	Edge     string
	First    uint64 // where the refused batch starts
	Expected uint64 // the next sequence the cloud accepts from Edge
}

func (e *SeqGapError) Error() string {
	return fmt.Sprintf("sequence gap: edge %q pushed from %d, the cloud expects %d", e.Edge, e.First, e.Expected)
}

// Is makes a *SeqGapError match ErrSeqGap.
func (e *SeqGapError) Is(target error) bool { return target == ErrSeqGap }

// OverloadedError is ErrOverloaded with when to retry: when the apply
// queue is expected to have room.
type OverloadedError struct {
	RetryAfter time.Duration
	err        error
}

func (e *OverloadedError) Error() string {
	if e.err == nil {
		return ErrOverloaded.Error()
	}
	return e.err.Error()
}

// Unwrap makes an *OverloadedError match ErrOverloaded and keeps the chain
// below.
func (e *OverloadedError) Unwrap() []error { return []error{ErrOverloaded, e.err} }

// kindError gives an error from a lower layer the service's sentinel kind
// while keeping its text (which may reach clients, as for join conflicts).
type kindError struct{ kind, err error }

func (e *kindError) Error() string   { return e.err.Error() }
func (e *kindError) Unwrap() []error { return []error{e.kind, e.err} }

// kind maps raftnode's and fsm's sentinels to the service's: the one place
// the layers below are translated.
func kind(err error) error {
	var k error
	switch {
	case err == nil:
		return nil
	case errors.Is(err, raftnode.ErrNotLeader):
		k = ErrNotLeader
	case errors.Is(err, raftnode.ErrOverloaded):
		var oe *raftnode.OverloadError
		if errors.As(err, &oe) {
			return &OverloadedError{RetryAfter: oe.RetryAfter, err: err}
		}
		k = ErrOverloaded
	case errors.Is(err, raftnode.ErrUnknownOutcome), errors.Is(err, raftnode.ErrStopped),
		errors.Is(err, context.DeadlineExceeded):
		k = ErrUnknownOutcome
	case errors.Is(err, raftnode.ErrConflict):
		k = ErrConflict
	case errors.Is(err, raftnode.ErrNoSuchNode):
		k = ErrNoSuchNode
	case errors.Is(err, fsm.ErrNotFound):
		k = ErrNotFound
	case errors.Is(err, fsm.ErrBadCursor):
		k = ErrBadCursor
	case errors.Is(err, fsm.ErrCompacted):
		k = ErrCompacted
	default:
		return err
	}
	return &kindError{kind: k, err: err}
}

// propose proposes cmd within the request timeout, stamped with the
// leader's wall time.
func (s *Service) propose(ctx context.Context, cmd *fsm.Command) (fsm.Result, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
	defer cancel()
	cmd.AtMs = s.cfg.Now().UnixMilli()
	res, err := s.raft.Propose(ctx, cmd)
	return res, kind(err)
}

// IsLeader reports whether this node leads (and so runs writes).
func (s *Service) IsLeader() bool { return s.raft.IsLeader() }

// Leader is the current leader's id and HTTP address, if one is known.
func (s *Service) Leader() (id, httpAddr string, ok bool) { return s.raft.Leader() }

// Barrier waits until this leader has applied everything committed before
// the call: what a strong read waits for.
func (s *Service) Barrier(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
	defer cancel()
	return kind(s.raft.Barrier(ctx))
}

// AppliedIndex is the last raft index applied to this node's state.
func (s *Service) AppliedIndex() uint64 { return s.state.AppliedIndex() }
