// Package sinks streams cloud-sync's export log to external systems: NATS
// JetStream and Kafka (`export.sinks` in the configuration).
//
// Each message is one export record, the same JSON as one line of
// GET /api/v1/export, keyed by its export cursor ("INDEX.N"): the
// Nats-Msg-Id header (JetStream drops a duplicate within its duplicate
// window) and the Kafka record key. Delivery is at least once and in log
// order, so in order per device: one publisher per sink sends a batch of
// records pipelined, waits until the sink has acknowledged all of them, and
// only then reads the next; a failed batch is sent again, whole, after a
// backoff (pkg/backoff), and a sink that is down catches up when it returns.
//
// Only the raft leader publishes. Each sink's position is replicated
// (fsm.CmdSinkCursor: the raft index up to which, inclusive, the sink has
// taken everything), proposed at most once per CursorInterval and only when
// records were delivered since the last one, so an idle cluster adds no
// entries. When this node stops leading, its publishers stop; the next
// leader resumes from the replicated cursor, re-sending at most what was
// delivered since the last cursor entry, with the same keys.
package sinks

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/pkg/backoff"
	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
)

// Message is one export record as a sink receives it.
type Message struct {
	Key    string // the record's export cursor
	Device string // the record's device ("" for user changes): Kafka partitions by it
	Value  []byte // the record's JSON
}

// Publisher delivers messages to one sink. Publish returns nil only when
// the sink has durably taken every message, in order; after an error any
// prefix may have been taken, and the caller sends the batch again.
type Publisher interface {
	Publish(ctx context.Context, msgs []Message) error
	Close()
}

// Dialer connects to a sink.
type Dialer func(ctx context.Context, c Config, log *slog.Logger) (Publisher, error)

// Dial connects to a sink of either type: the production Dialer.
func Dial(ctx context.Context, c Config, log *slog.Logger) (Publisher, error) {
	switch c.Type {
	case TypeNATS:
		return dialNATS(ctx, c, log)
	case TypeKafka:
		return dialKafka(ctx, c, log)
	}
	return nil, fmt.Errorf("sink %s: unknown type %q", c.Name, c.Type)
}

// Log is the raft side the publishers need; *raftnode.Node satisfies it.
type Log interface {
	IsLeader() bool
	Barrier(ctx context.Context) error
	Propose(ctx context.Context, c *fsm.Command) (fsm.Result, error)
}

// State is the replicated state the publishers read; *fsm.FSM satisfies
// it.
type State interface {
	AppliedIndex() uint64
	WaitApplied(done <-chan struct{}, index uint64) bool
	Export(cursor string, limit int, emit func(*fsm.ExportRecord) error) (string, error)
	SinkCursor(sink string) (index uint64, ok bool, err error)
	SinkCursors() (map[string]uint64, error)
	ExportBehind(index uint64, maxEntries int) (entries, records int, complete bool, err error)
}

// maxLagScan bounds the entries a lag computation looks at.
const maxLagScan = 100_000

// leaderPoll is how often Run checks whether this node leads.
const leaderPoll = 100 * time.Millisecond

// Status is one sink as GET /api/v1/sinks shows it.
type Status struct {
	Name string `json:"name"`
	// Configured is false for a cursor left by a sink no longer in the
	// configuration: it still holds log retention back until it is
	// removed (DELETE /api/v1/sinks/{name}).
	Configured bool   `json:"configured"`
	Type       string `json:"type,omitempty"`
	Target     string `json:"target,omitempty"`
	// Cursor is the replicated position: every record of the entries at or
	// below this raft index has been taken.
	Cursor uint64 `json:"cursor"`
	// Active: this node leads and runs the sink's publisher. Position is
	// the export cursor of the last record the sink acknowledged in this
	// term (it may be ahead of Cursor).
	Active   bool   `json:"active"`
	Position string `json:"position,omitempty"`
	// Lag: export-log entries and records after the sink's position;
	// LagExact is false when counting stopped at 100,000 entries.
	LagEntries int  `json:"lag_entries"`
	LagRecords int  `json:"lag_records"`
	LagExact   bool `json:"lag_exact"`
	// Published counts records acknowledged on this node since it started;
	// Failures, failed attempts (connect or publish).
	Published uint64 `json:"published"`
	Failures  uint64 `json:"failures"`
	// LastError is the latest failure on this node, LastErrorAt when (Unix
	// ms), and LastSuccessAt the latest acknowledged batch.
	LastError     string `json:"last_error,omitempty"`
	LastErrorAt   int64  `json:"last_error_at,omitempty"`
	LastSuccessAt int64  `json:"last_success_at,omitempty"`
}

// Manager runs the configured sinks' publishers while this node leads.
type Manager struct {
	opts  Options
	raft  Log
	state State
	log   *slog.Logger
	dial  Dialer
	now   func() time.Time
	sinks []*sink
}

// sink is one sink's soft state; its publisher goroutine writes it, status
// readers read it.
type sink struct {
	cfg Config

	mu        sync.Mutex
	active    bool
	taken     uint64 // index, inclusive, up to which the sink took everything (this term)
	position  string
	published uint64
	failures  uint64
	lastErr   string
	lastErrAt int64
	lastOKAt  int64
}

// New builds the manager; Run starts it. dial nil means Dial.
func New(opts Options, raft Log, state State, log *slog.Logger, reg prometheus.Registerer, dial Dialer) *Manager {
	opts.defaults()
	if dial == nil {
		dial = Dial
	}
	m := &Manager{opts: opts, raft: raft, state: state, log: log, dial: dial, now: time.Now}
	for _, c := range opts.Sinks {
		m.sinks = append(m.sinks, &sink{cfg: c})
	}
	if reg != nil {
		reg.MustRegister(collector{m})
	}
	return m
}

// Run publishes while this node leads, until ctx ends.
func (m *Manager) Run(ctx context.Context) {
	if len(m.sinks) == 0 {
		return
	}
	t := time.NewTicker(leaderPoll)
	defer t.Stop()
	var (
		stop func()
		wg   sync.WaitGroup
	)
	end := func() {
		if stop != nil {
			stop()
			wg.Wait()
			stop = nil
		}
	}
	defer end()
	for {
		leads := m.raft.IsLeader()
		switch {
		case leads && stop == nil:
			term, cancel := context.WithCancel(ctx)
			stop = cancel
			for _, s := range m.sinks {
				wg.Add(1)
				go func() { defer wg.Done(); m.publish(term, s) }()
			}
			m.log.Info("export sinks: leading, publishing", "sinks", len(m.sinks))
		case !leads && stop != nil:
			end()
			m.log.Info("export sinks: no longer leading, publishers stopped")
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// publish runs one sink's publisher for one leadership term.
func (m *Manager) publish(ctx context.Context, s *sink) {
	log := m.log.With("sink", s.cfg.Name)
	bo := backoff.Backoff{Base: min(250*time.Millisecond, m.opts.RetryMax), Max: m.opts.RetryMax}
	wait := func() bool {
		select {
		case <-ctx.Done():
			return false
		case <-time.After(bo.Next()):
			return true
		}
	}
	// The state may lag the log right after an election: a barrier applies
	// everything committed, the previous leader's last cursor included.
	var cursor uint64
	for {
		err := m.raft.Barrier(ctx)
		var ok bool
		if err == nil {
			cursor, ok, err = m.state.SinkCursor(s.cfg.Name)
		}
		if err == nil && !ok {
			// Registered at 0, so retention keeps the log for this sink
			// before it has taken anything.
			_, err = m.raft.Propose(ctx, &fsm.Command{Type: fsm.CmdSinkCursor, AtMs: m.now().UnixMilli(),
				Sink: &fsm.SinkCursorCmd{Sink: s.cfg.Name, Index: 0}})
		}
		if err == nil {
			break
		}
		if ctx.Err() != nil || !m.raft.IsLeader() {
			return
		}
		log.Warn("export sink: reading the replicated cursor failed; retrying", "err", err)
		if !wait() {
			return
		}
	}
	bo.Reset()
	pos := strconv.FormatUint(cursor, 10) // a bare index resumes after that entry
	s.begin(cursor, pos)
	defer s.end()
	log.Info("export sink: publishing", "from", cursor, "target", s.cfg.Target())

	var (
		pub       Publisher
		proposed  = cursor
		lastProp  = m.now()
		delivered bool // records taken since the last cursor proposal
	)
	defer func() {
		if pub != nil {
			pub.Close()
		}
	}()
	for ctx.Err() == nil {
		applied := m.state.AppliedIndex()
		msgs, next, full, err := m.read(pos)
		if err != nil {
			s.fail(m.now(), err)
			log.Error("export sink: reading the export log failed", "err", err)
			if !wait() {
				return
			}
			continue
		}
		if len(msgs) > 0 {
			for {
				if pub == nil {
					pub, err = m.dial(ctx, s.cfg, log)
				}
				if err == nil {
					err = pub.Publish(ctx, msgs)
				}
				if err == nil {
					break
				}
				if ctx.Err() != nil {
					return
				}
				if pub != nil {
					pub.Close()
					pub = nil
				}
				s.fail(m.now(), err)
				log.Warn("export sink: delivery failed; retrying the batch", "from", msgs[0].Key, "records", len(msgs), "err", err)
				if !wait() {
					return
				}
			}
			bo.Reset()
			delivered = true
		}
		// Everything up to the entry before the last record's is taken,
		// and when the read reached the end of the log, everything applied
		// before it.
		taken := s.takenIndex()
		if !full {
			taken = max(taken, applied)
		} else if idx, _, err := fsm.ParseExportCursor(next); err == nil && idx > 0 {
			taken = max(taken, idx-1)
		}
		s.ok(m.now(), next, taken, len(msgs))
		pos = next
		if delivered && taken > proposed && m.now().Sub(lastProp) >= m.opts.CursorInterval {
			if _, err := m.raft.Propose(ctx, &fsm.Command{Type: fsm.CmdSinkCursor, AtMs: m.now().UnixMilli(),
				Sink: &fsm.SinkCursorCmd{Sink: s.cfg.Name, Index: taken}}); err != nil {
				if ctx.Err() != nil {
					return
				}
				log.Warn("export sink: replicating the cursor failed; retrying", "index", taken, "err", err)
			} else {
				proposed, delivered = taken, false
			}
			lastProp = m.now()
		}
		if !full {
			// Caught up: wait for the next entry, or for the moment the
			// cursor is due.
			w, cancel := context.WithTimeout(ctx, m.opts.CursorInterval)
			m.state.WaitApplied(w.Done(), applied+1)
			cancel()
		}
	}
}

// maxBatchBytes bounds the JSON one batch holds (at least one record is
// read, whatever its size): a batch of large readings records stays
// within a few MiB of memory.
const maxBatchBytes = 4 << 20

// errBatchFull stops an export read at maxBatchBytes.
var errBatchFull = errors.New("batch full")

// read returns up to a batch of records after pos, the cursor of the last
// one (pos when there are none), and whether the batch is full: false
// means the read reached the end of the log.
func (m *Manager) read(pos string) (msgs []Message, next string, full bool, err error) {
	size := 0
	_, err = m.state.Export(pos, m.opts.Batch, func(r *fsm.ExportRecord) error {
		v, err := json.Marshal(r)
		if err != nil {
			return err
		}
		msgs = append(msgs, Message{Key: r.Cursor, Device: r.Device, Value: v})
		if size += len(v); size >= maxBatchBytes {
			return errBatchFull
		}
		return nil
	})
	full = len(msgs) == m.opts.Batch || errors.Is(err, errBatchFull)
	if errors.Is(err, errBatchFull) {
		err = nil
	}
	next = pos
	if len(msgs) > 0 {
		next = msgs[len(msgs)-1].Key
	}
	return msgs, next, full, err
}

func (s *sink) begin(cursor uint64, pos string) {
	s.mu.Lock()
	s.active, s.taken, s.position = true, cursor, pos
	s.mu.Unlock()
}

func (s *sink) end() {
	s.mu.Lock()
	s.active = false
	s.mu.Unlock()
}

func (s *sink) takenIndex() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.taken
}

func (s *sink) ok(now time.Time, pos string, taken uint64, n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.position, s.taken = pos, taken
	if n > 0 {
		s.published += uint64(n)
		s.lastOKAt = now.UnixMilli()
	}
}

func (s *sink) fail(now time.Time, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failures++
	s.lastErr, s.lastErrAt = err.Error(), now.UnixMilli()
}

// Status reports every configured sink as this node sees it (on the
// leader with its publishers' positions and errors, elsewhere the
// replicated cursor and the lag from it), then the cursors of sinks no
// longer configured, by name.
func (m *Manager) Status() ([]Status, error) {
	cursors, err := m.state.SinkCursors()
	if err != nil {
		return nil, err
	}
	out := make([]Status, 0, len(cursors)+len(m.sinks))
	for _, s := range m.sinks {
		cursor := cursors[s.cfg.Name]
		delete(cursors, s.cfg.Name)
		s.mu.Lock()
		st := Status{Name: s.cfg.Name, Configured: true, Type: s.cfg.Type, Target: s.cfg.Target(), Cursor: cursor,
			Active: s.active, Published: s.published, Failures: s.failures,
			LastError: s.lastErr, LastErrorAt: s.lastErrAt, LastSuccessAt: s.lastOKAt}
		from := cursor
		if s.active {
			st.Position = s.position
			from = max(from, s.taken)
		}
		s.mu.Unlock()
		if st.LagEntries, st.LagRecords, st.LagExact, err = m.lag(from, st.Position); err != nil {
			return nil, err
		}
		out = append(out, st)
	}
	for _, name := range slices.Sorted(maps.Keys(cursors)) {
		st := Status{Name: name, Cursor: cursors[name]}
		if st.LagEntries, st.LagRecords, st.LagExact, err = m.lag(st.Cursor, ""); err != nil {
			return nil, err
		}
		out = append(out, st)
	}
	return out, nil
}

// Errors of Forget.
var (
	// ErrUnknownSink: no cursor of that name is recorded.
	ErrUnknownSink = errors.New("no such sink cursor")
	// ErrSinkConfigured: the sink is in this node's configuration; its
	// publisher would only record it again.
	ErrSinkConfigured = errors.New("sink is configured")
	// ErrNotLeader: only the leader proposes; run Forget there.
	ErrNotLeader = errors.New("not the raft leader")
)

// Forget drops the replicated cursor of a sink that is no longer
// configured, so that it stops holding log retention back. Run it on the
// leader.
func (m *Manager) Forget(ctx context.Context, name string) error {
	for _, s := range m.sinks {
		if s.cfg.Name == name {
			return fmt.Errorf("%w: %s (remove it from export.sinks on every node first)", ErrSinkConfigured, name)
		}
	}
	if !m.raft.IsLeader() {
		return ErrNotLeader
	}
	if _, ok, err := m.state.SinkCursor(name); err != nil {
		return err
	} else if !ok {
		return fmt.Errorf("%w: %q", ErrUnknownSink, name)
	}
	_, err := m.raft.Propose(ctx, &fsm.Command{Type: fsm.CmdSinkCursor, AtMs: m.now().UnixMilli(),
		Sink: &fsm.SinkCursorCmd{Sink: name, Remove: true}})
	if err != nil {
		return fmt.Errorf("forget sink %s: %w", name, err)
	}
	m.log.Info("export sink: cursor removed", "sink", name)
	return nil
}

// lag counts the export log after index, less the records of the entry
// after it that position says were taken already.
func (m *Manager) lag(index uint64, position string) (entries, records int, exact bool, err error) {
	entries, records, exact, err = m.state.ExportBehind(index, maxLagScan)
	if err != nil || position == "" {
		return entries, records, exact, err
	}
	idx, sub, perr := fsm.ParseExportCursor(position)
	if perr != nil || idx <= index || sub < 0 || sub >= 1<<31-1 {
		return entries, records, exact, err
	}
	// The sink took records 0..sub of entry idx (> index): not lag.
	records = max(records-(sub+1), 0)
	return entries, records, exact, err
}

// collector exports the sinks' status as metrics at scrape time.
type collector struct{ m *Manager }

var (
	descLagRecords = prometheus.NewDesc("outpost_cloud_sink_lag_records",
		"Export records the sink has not taken yet (counted over at most 100,000 log entries).", []string{"sink"}, nil)
	descLagEntries = prometheus.NewDesc("outpost_cloud_sink_lag_entries",
		"Export-log entries the sink has not taken yet.", []string{"sink"}, nil)
	descCursor = prometheus.NewDesc("outpost_cloud_sink_cursor",
		"The sink's replicated cursor: the raft index up to which it took everything.", []string{"sink"}, nil)
	descActive = prometheus.NewDesc("outpost_cloud_sink_active",
		"1 on the node publishing to the sink (the leader).", []string{"sink"}, nil)
	descPublished = prometheus.NewDesc("outpost_cloud_sink_published_total",
		"Export records the sink acknowledged, published from this node.", []string{"sink"}, nil)
	descFailures = prometheus.NewDesc("outpost_cloud_sink_failures_total",
		"Failed attempts to connect or deliver to the sink from this node.", []string{"sink"}, nil)
	descLastError = prometheus.NewDesc("outpost_cloud_sink_last_error_timestamp_seconds",
		"When the sink last failed on this node (0: never); the error is in GET /api/v1/sinks.", []string{"sink"}, nil)
)

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descLagRecords, descLagEntries, descCursor, descActive, descPublished, descFailures, descLastError} {
		ch <- d
	}
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	sts, err := c.m.Status()
	if err != nil {
		return
	}
	b2f := func(b bool) float64 {
		if b {
			return 1
		}
		return 0
	}
	for _, s := range sts {
		ch <- prometheus.MustNewConstMetric(descLagRecords, prometheus.GaugeValue, float64(s.LagRecords), s.Name)
		ch <- prometheus.MustNewConstMetric(descLagEntries, prometheus.GaugeValue, float64(s.LagEntries), s.Name)
		ch <- prometheus.MustNewConstMetric(descCursor, prometheus.GaugeValue, float64(s.Cursor), s.Name)
		ch <- prometheus.MustNewConstMetric(descActive, prometheus.GaugeValue, b2f(s.Active), s.Name)
		ch <- prometheus.MustNewConstMetric(descPublished, prometheus.CounterValue, float64(s.Published), s.Name)
		ch <- prometheus.MustNewConstMetric(descFailures, prometheus.CounterValue, float64(s.Failures), s.Name)
		ch <- prometheus.MustNewConstMetric(descLastError, prometheus.GaugeValue, float64(s.LastErrorAt)/1000, s.Name)
	}
}
