// Package ingest turns device messages into durable store writes: it decodes
// and validates MQTT payloads, group-commits them to the store through a
// single writer, and reports each message done only after its transaction is
// on disk, so that the broker acknowledgement means "stored". Invalid
// messages become dead letters; a full disk quota becomes backpressure.
package ingest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/store"
)

// ErrStopped is returned by Submit once the writer is shutting down; the
// message was not stored and must not be acknowledged.
var ErrStopped = errors.New("ingest: writer stopped")

// Store is what the writer needs from storage.
type Store interface {
	Ingest(items []store.Item, dead []store.DeadLetter, saves ...store.RuleSave) ([]store.ItemResult, error)
	// SaveRuleEvents saves on its own, once the writer has stopped.
	SaveRuleEvents(seq uint64, evs []rules.Event) error
	OutboxTrimPending() bool
	Usage() (int64, error)
}

// Message is one MQTT message handed to the writer.
type Message struct {
	Topic    string
	Payload  []byte
	Received time.Time
	// Done is called exactly once: with nil when the message is durable
	// (stored, recognised as a duplicate, or dead-lettered), so it may be
	// acknowledged; with an error when it was not stored and must not be.
	Done func(err error)
}

// Config tunes the writer.
type Config struct {
	MaxBatch int // messages per transaction
	// MaxBatchReadings also closes a batch once it holds this many
	// readings, so array payloads do not make one transaction (and the
	// memory it pins) huge.
	MaxBatchReadings int
	Linger           time.Duration // extra wait for a batch to fill; 0 commits whatever is queued
	QueueSize        int
	// QuotaBytes stops acknowledging new messages while the store uses more
	// than this (0: no quota). MinFreeBytes does the same when the
	// filesystem has less free space than this.
	QuotaBytes   int64
	MinFreeBytes int64
	QuotaCheck   time.Duration
	// FreeBytes reports free space on the data filesystem; nil disables the
	// free-space check.
	FreeBytes func() (int64, error)
	// Committed, when set, is called on the writer's goroutine after each
	// commit that stored items, once their messages are acknowledged. It
	// must not block: the edge's rule runner only takes a signal and reads
	// what was committed from the store (pkg/alerting).
	Committed func()
	// UnsafeAckBeforeCommit reports messages done before they are written.
	// It exists only so the crash test can prove it detects loss.
	UnsafeAckBeforeCommit bool
}

// DefaultConfig is the one source of the writer's defaults; the edge's
// configuration builds on it. QueueSize is left 0: it follows MaxBatch.
//
// A commit costs bbolt about the same pages for one message of a device as
// for several (BenchmarkIngestCPU), and devices whose messages wait on the
// commit in progress send their next ones only after it: without a wait,
// batches alternate between halves of what is in flight. A millisecond of
// Linger lets a batch gather both halves, for less CPU per message under
// load (BenchmarkWriter: 6-25 % on a busy two-core machine), at a
// millisecond of latency.
func DefaultConfig() Config {
	return Config{MaxBatch: 1000, MaxBatchReadings: 20000, Linger: time.Millisecond, QuotaCheck: time.Second}
}

// defaults fills what c leaves zero from DefaultConfig.
func (c *Config) defaults() {
	d := DefaultConfig()
	if c.MaxBatch <= 0 {
		c.MaxBatch = d.MaxBatch
	}
	if c.MaxBatchReadings <= 0 {
		c.MaxBatchReadings = d.MaxBatchReadings
	}
	if c.QueueSize <= 0 {
		// One batch queued while another commits keeps the writer busy;
		// more only adds latency and memory.
		c.QueueSize = c.MaxBatch
	}
	if c.QuotaCheck <= 0 {
		c.QuotaCheck = d.QuotaCheck
	}
}

type pending struct {
	topic   string
	payload []byte
	item    store.Item
	dead    *store.DeadLetter
	tooOld  bool // dead for a reading older than retention (ErrTooOld)
	done    func(error)
	start   time.Time
}

// Writer is the single group-commit writer.
type Writer struct {
	st      Store
	dec     *Decoder
	cfg     Config
	log     *slog.Logger
	in      chan *pending
	saves   chan *ruleSave
	mu      sync.RWMutex // Submit and SaveRuleEvents hold it shared while sending; stop takes it to fence sends
	stopped chan struct{}

	backpressure atomic.Bool
	m            writerMetrics
}

type writerMetrics struct {
	messages *prometheus.CounterVec
	// The messages children, resolved once rather than per message.
	stored, duplicate, deadLetter prometheus.Counter
	// tooOld counts the dead letters of readings older than retention.
	tooOld prometheus.Counter

	readings     prometheus.Counter
	batchSize    prometheus.Histogram
	commit       prometheus.Histogram
	ackLatency   prometheus.Histogram
	backpressure prometheus.Gauge
	commitErrors prometheus.Counter
}

// NewWriter returns a writer; start it with Run.
func NewWriter(st Store, dec *Decoder, cfg Config, reg prometheus.Registerer, log *slog.Logger) *Writer {
	cfg.defaults()
	w := &Writer{st: st, dec: dec, cfg: cfg, log: log, in: make(chan *pending, cfg.QueueSize),
		saves: make(chan *ruleSave, maxQueuedSaves), stopped: make(chan struct{})}
	w.m = writerMetrics{
		messages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "outpost_ingest_messages_total", Help: "MQTT messages handled, by result (stored, duplicate, dead_letter).",
		}, []string{"result"}),
		readings: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "outpost_ingest_readings_total", Help: "Readings newly stored.",
		}),
		tooOld: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "outpost_ingest_too_old_total",
			Help: "Messages dead-lettered because a reading was older than the edge's retention (also in messages_total{result=\"dead_letter\"}).",
		}),
		batchSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "outpost_ingest_batch_messages", Help: "Messages per group commit.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 12),
		}),
		commit: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "outpost_ingest_commit_duration_seconds", Help: "Latency of one group commit (write and fsync).",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 14),
		}),
		ackLatency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "outpost_ingest_ack_duration_seconds", Help: "Time from receipt to durable acknowledgement.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}),
		backpressure: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "outpost_ingest_backpressure", Help: "1 while the disk quota stops acknowledgements.",
		}),
		commitErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "outpost_ingest_commit_errors_total", Help: "Group commits that failed; their messages were not acknowledged.",
		}),
	}
	w.m.stored = w.m.messages.WithLabelValues("stored")
	w.m.duplicate = w.m.messages.WithLabelValues("duplicate")
	w.m.deadLetter = w.m.messages.WithLabelValues("dead_letter")
	if reg != nil {
		reg.MustRegister(w.m.messages, w.m.readings, w.m.tooOld, w.m.batchSize, w.m.commit, w.m.ackLatency, w.m.backpressure, w.m.commitErrors,
			prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Name: "outpost_ingest_queue_depth", Help: "Messages decoded and waiting for the writer.",
			}, func() float64 { return float64(len(w.in)) }))
	}
	return w
}

// Backpressure reports whether the quota currently stops acknowledgements.
// It also checks the quota now, so an idle writer over quota reports it.
func (w *Writer) Backpressure() bool {
	return w.backpressure.Load() || w.overQuota() != ""
}

// Submit decodes m on the caller's goroutine and queues it for the next
// commit. It blocks while the queue is full, which is how backpressure
// reaches the broker. m.Done is called later unless Submit returns an error.
func (w *Writer) Submit(ctx context.Context, m *Message) error {
	p := &pending{topic: m.Topic, payload: m.Payload, done: m.Done, start: m.Received}
	if p.start.IsZero() {
		p.start = time.Now()
	}
	item, err := w.dec.Decode(m.Topic, m.Payload, p.start)
	if err != nil {
		p.dead = &store.DeadLetter{At: p.start.UnixMilli(), Topic: m.Topic, Reason: err.Error(), Payload: m.Payload}
		p.tooOld = errors.Is(err, ErrTooOld)
	} else {
		p.item = item
	}
	w.mu.RLock()
	defer w.mu.RUnlock()
	select {
	case <-w.stopped:
		return ErrStopped
	default:
	}
	if w.cfg.UnsafeAckBeforeCommit {
		done := p.done
		p.done = func(error) {}
		defer done(nil)
	}
	select {
	case w.in <- p:
		return nil
	case <-w.stopped:
		return ErrStopped
	case <-ctx.Done():
		return fmt.Errorf("submit: %w", ctx.Err())
	}
}

// ruleSave is a SaveRuleEvents call waiting for the commit that carries it.
type ruleSave struct {
	save store.RuleSave
	done chan error // buffered: the writer never waits for the caller
}

// maxQueuedSaves is the saves a commit may gather; the rule runner makes
// one at a time, so more only happen with several callers.
const maxQueuedSaves = 64

// SaveRuleEvents saves the rule runner's events and its outbox position
// (store.SaveRuleEvents' arguments) in the next group commit, with the
// messages queued for it, and returns once that commit is durable: the
// runner's saves then take neither a transaction nor an fsync of their
// own, nor contend with the writer for bbolt's writer lock. A save with
// no message queued commits at once, on its own. Once the writer has
// stopped, the save is the store's own transaction.
//
// When the commit deleted only a chunk of the outbox entries the save
// released (store.OutboxTrimPending), it saves again until they are gone,
// each pass riding a commit too.
func (w *Writer) SaveRuleEvents(ctx context.Context, seq uint64, evs []rules.Event) error {
	for {
		queued, err := w.queueSave(ctx, store.RuleSave{Seq: seq, Events: evs})
		if !queued {
			if err != nil {
				return err
			}
			return w.st.SaveRuleEvents(seq, evs) // stopped
		}
		if err != nil || !w.st.OutboxTrimPending() {
			return err
		}
		evs = nil // saved: the next pass only deletes
	}
}

// queueSave hands sv to Run and waits for its commit. queued is false when
// it was not handed over: the writer stopped (err nil) or ctx ended.
func (w *Writer) queueSave(ctx context.Context, sv store.RuleSave) (queued bool, err error) {
	rs := &ruleSave{save: sv, done: make(chan error, 1)}
	if !w.sendSave(ctx, rs) {
		return false, ctx.Err()
	}
	// Run answers every save it took, drain included.
	return true, <-rs.done
}

func (w *Writer) sendSave(ctx context.Context, rs *ruleSave) bool {
	w.mu.RLock()
	defer w.mu.RUnlock()
	select {
	case <-w.stopped:
		return false
	default:
	}
	select {
	case w.saves <- rs:
		return true
	case <-w.stopped:
		return false
	case <-ctx.Done():
		return false
	}
}

// Run commits batches until ctx is cancelled, then stops accepting, commits
// what was already queued, and returns.
func (w *Writer) Run(ctx context.Context) error {
	batch := make([]*pending, 0, w.cfg.MaxBatch)
	var saves []*ruleSave
	lastQuota := time.Time{}
	for {
		batch, saves = batch[:0], saves[:0]
		select {
		case <-ctx.Done():
			return w.drain(batch)
		case p := <-w.in:
			batch = append(batch, p)
		case rs := <-w.saves:
			saves = append(saves, rs)
		}
		batch, saves = w.fill(ctx, batch, saves)
		if time.Since(lastQuota) >= w.cfg.QuotaCheck || w.backpressure.Load() {
			var ok bool
			if saves, ok = w.waitQuota(ctx, saves); !ok {
				w.fail(batch, ErrStopped)
				return w.drain(batch[:0])
			}
			lastQuota = time.Now()
		}
		w.commit(batch, saves)
	}
}

// fill gathers more queued messages and saves into batch and saves,
// waiting up to Linger for messages once it holds one: a save with no
// message queued is not kept waiting, and one that finds messages queued
// does not cut their batch short.
func (w *Writer) fill(ctx context.Context, batch []*pending, saves []*ruleSave) ([]*pending, []*ruleSave) {
	var timer <-chan time.Time
	readings := 0
	for _, p := range batch {
		readings += len(p.item.Readings)
	}
	for len(batch) < w.cfg.MaxBatch && readings < w.cfg.MaxBatchReadings {
		select {
		case p := <-w.in:
			batch = append(batch, p)
			readings += len(p.item.Readings)
			continue
		case rs := <-w.saves:
			saves = append(saves, rs)
			continue
		default:
		}
		if timer == nil && w.cfg.Linger > 0 && len(batch) > 0 {
			t := time.NewTimer(w.cfg.Linger)
			defer t.Stop()
			timer = t.C
		}
		if timer == nil {
			return batch, saves
		}
		select {
		case p := <-w.in:
			batch = append(batch, p)
			readings += len(p.item.Readings)
		case rs := <-w.saves:
			saves = append(saves, rs)
		case <-timer:
			return batch, saves
		case <-ctx.Done():
			return batch, saves
		}
	}
	return batch, saves
}

// waitQuota blocks while the store is over quota, returning false if ctx is
// cancelled meanwhile. Nothing is deleted to make room: retention or an
// operator must free space. Rule saves add no readings and release outbox
// entries, so they commit whatever the quota says: those held (returned
// emptied once committed) and those that come while it waits.
func (w *Writer) waitQuota(ctx context.Context, held []*ruleSave) ([]*ruleSave, bool) {
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		reason := w.overQuota()
		if reason == "" {
			if w.backpressure.Swap(false) {
				w.log.Info("disk quota ok again, resuming ingest")
				w.m.backpressure.Set(0)
			}
			return held, true
		}
		if len(held) > 0 {
			w.commit(nil, held)
			held = held[:0]
		}
		if !w.backpressure.Swap(true) {
			w.log.Warn("backpressure: not acknowledging device messages", "reason", reason)
			w.m.backpressure.Set(1)
		}
		select {
		case <-ctx.Done():
			return held, false
		case rs := <-w.saves:
			w.commit(nil, []*ruleSave{rs})
		case <-tick.C:
		}
	}
}

func (w *Writer) overQuota() string {
	if w.cfg.QuotaBytes > 0 {
		used, err := w.st.Usage()
		if err != nil {
			return err.Error()
		}
		if used >= w.cfg.QuotaBytes {
			return fmt.Sprintf("store uses %d bytes, quota %d", used, w.cfg.QuotaBytes)
		}
	}
	if w.cfg.MinFreeBytes > 0 && w.cfg.FreeBytes != nil {
		free, err := w.cfg.FreeBytes()
		if err != nil {
			return err.Error()
		}
		if free < w.cfg.MinFreeBytes {
			return fmt.Sprintf("%d bytes free on disk, minimum %d", free, w.cfg.MinFreeBytes)
		}
	}
	return ""
}

// commit writes batch and saves in one transaction, then reports each
// message done and answers each save.
func (w *Writer) commit(batch []*pending, saves []*ruleSave) {
	if len(batch) == 0 && len(saves) == 0 {
		return
	}
	items := make([]store.Item, 0, len(batch))
	var dead []store.DeadLetter
	for _, p := range batch {
		if p.dead != nil {
			dead = append(dead, *p.dead)
		} else {
			items = append(items, p.item)
		}
	}
	var svs []store.RuleSave
	for _, rs := range saves {
		svs = append(svs, rs.save)
	}
	t0 := time.Now()
	results, err := w.st.Ingest(items, dead, svs...)
	w.m.commit.Observe(time.Since(t0).Seconds())
	if len(batch) > 0 {
		w.m.batchSize.Observe(float64(len(batch)))
	}
	if err != nil {
		w.m.commitErrors.Inc()
		if len(saves) > 0 && len(batch) > 0 {
			// Neither may fail the other: the saves alone, then the
			// messages as if they had come alone.
			w.commit(nil, saves)
			w.commit(batch, nil)
			return
		}
		if len(batch) == 0 {
			for _, rs := range saves {
				rs.done <- err
			}
			return
		}
		if len(batch) > 1 {
			// One bad message must not fail its neighbours forever on every
			// redelivery: retry one by one, and dead-letter what still fails.
			w.log.Warn("group commit failed; retrying messages one by one", "messages", len(batch), "err", err)
			for _, p := range batch {
				w.commit([]*pending{p}, nil)
			}
			return
		}
		w.poison(batch[0], err)
		return
	}
	// The counters take one addition per batch, before any message is
	// reported done, so a caller that saw its message done sees it counted.
	var stored, duplicate, deadLetter, tooOld, readings int
	i := 0
	for _, p := range batch {
		switch {
		case p.dead != nil:
			deadLetter++
			if p.tooOld {
				tooOld++
			}
		case results[i].Stored == 0 && results[i].Duplicates > 0:
			duplicate++
			i++
		default:
			stored++
			readings += results[i].Stored
			i++
		}
	}
	addCount(w.m.stored, stored)
	addCount(w.m.duplicate, duplicate)
	addCount(w.m.deadLetter, deadLetter)
	addCount(w.m.tooOld, tooOld)
	addCount(w.m.readings, readings)
	now := time.Now()
	for _, p := range batch {
		w.m.ackLatency.Observe(now.Sub(p.start).Seconds())
		p.done(nil)
	}
	for _, rs := range saves {
		rs.done <- nil
	}
	if w.cfg.Committed != nil && len(items) > 0 {
		w.cfg.Committed() // after the acks: it never delays one
	}
}

func addCount(c prometheus.Counter, n int) {
	if n > 0 {
		c.Add(float64(n))
	}
}

// poison dead-letters a message the store refused on its own. If even the
// dead letter cannot be written the store itself is failing, and the message
// stays unacknowledged for the broker to redeliver.
func (w *Writer) poison(p *pending, cause error) {
	if p.dead == nil {
		dl := store.DeadLetter{At: p.start.UnixMilli(), Topic: p.topic, Reason: "store refused the message: " + cause.Error(), Payload: p.payload}
		if _, err := w.st.Ingest(nil, []store.DeadLetter{dl}); err == nil {
			w.m.deadLetter.Inc()
			w.log.Warn("message dead-lettered after the store refused it", "topic", p.topic, "err", cause)
			p.done(nil)
			return
		}
	}
	w.log.Error("commit failed; message not acknowledged", "topic", p.topic, "err", cause)
	p.done(cause)
}

func (w *Writer) fail(batch []*pending, err error) {
	for _, p := range batch {
		p.done(err)
	}
}

// drain fences further submissions and commits what is queued.
func (w *Writer) drain(batch []*pending) error {
	close(w.stopped)
	w.mu.Lock() // wait for in-flight Submits and saves to either enqueue or give up
	defer w.mu.Unlock()
	var saves []*ruleSave
	for {
		batch, saves = batch[:0], saves[:0]
	gather:
		for len(batch) < w.cfg.MaxBatch {
			select {
			case p := <-w.in:
				batch = append(batch, p)
			case rs := <-w.saves:
				saves = append(saves, rs)
			default:
				break gather
			}
		}
		if len(batch) == 0 && len(saves) == 0 {
			return nil
		}
		if len(batch) > 0 && w.Backpressure() {
			// Over quota at shutdown: nothing is written to make room, so
			// these stay unacknowledged and are redelivered after restart.
			w.fail(batch, ErrStopped)
			batch = batch[:0]
		}
		w.commit(batch, saves)
	}
}
