package service

import (
	"context"
	"time"

	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
)

// Retention. The leader proposes compactions (fsm.CmdCompact) with cutoffs
// from its own clock, in bounded chunks, so every replica deletes the same
// records and no raft entry holds the apply goroutine for long. Each kind of
// state runs on its own period, a quarter of its window (between
// minCompactEvery and maxCompactEvery): with a 1-minute retention readings
// live at most about 75 s, with the 720h default the pass runs every 10
// minutes.

const (
	// compactChunk bounds one compaction command's work (deletions or
	// devices visited).
	compactChunk = 5000
	// maxCompactChunks bounds one pass: the rest waits for the next tick.
	maxCompactChunks = 1000
	minCompactEvery  = 100 * time.Millisecond
	maxCompactEvery  = 10 * time.Minute
)

// compactEvery is how often state kept for window is compacted.
func compactEvery(window time.Duration) time.Duration {
	return min(max(window/4, minCompactEvery), maxCompactEvery)
}

// RunRetention compacts readings older than Config.Retention, export-log
// entries older than Config.LogRetention that every configured sink took,
// and tombstones older than Config.MaxOffline, while this node leads, until
// ctx ends.
func (s *Service) RunRetention(ctx context.Context) {
	type part struct {
		what   string
		window time.Duration
		next   time.Time
	}
	now := s.cfg.Now()
	parts := []*part{
		{what: fsm.CompactReadings, window: s.cfg.Retention},
		{what: fsm.CompactLog, window: s.cfg.LogRetention},
		{what: fsm.CompactTombstones, window: s.cfg.MaxOffline},
	}
	tick := maxCompactEvery
	for _, p := range parts {
		p.next = now.Add(compactEvery(p.window))
		tick = min(tick, compactEvery(p.window))
	}
	s.everyWhileLeader(ctx, tick, func(leading bool) {
		if !leading {
			return
		}
		for _, p := range parts {
			now := s.cfg.Now()
			if now.Before(p.next) {
				continue
			}
			p.next = now.Add(compactEvery(p.window))
			if n := s.compact(ctx, p.what, now.Add(-p.window).UnixMilli()); n > 0 {
				s.log.Debug("compacted", "what", p.what, "records", n)
			}
		}
	})
}

// compact runs one pass of a compaction, chunk after chunk, and returns how
// many records went.
func (s *Service) compact(ctx context.Context, what string, cutoffMs int64) int {
	total := 0
	after := ""
	for i := 0; i < maxCompactChunks && ctx.Err() == nil; i++ {
		c := &fsm.CompactCmd{What: what, CutoffMs: cutoffMs, After: after, Limit: compactChunk}
		if what == fsm.CompactLog {
			c.Sinks = s.cfg.Sinks
		}
		res, err := s.propose(ctx, &fsm.Command{Type: fsm.CmdCompact, Compact: c})
		if err == nil {
			err = res.Err
		}
		if err != nil {
			if ctx.Err() == nil {
				s.log.Warn("compaction failed; retrying next round", "what", what, "err", err)
			}
			break
		}
		total += res.Applied
		s.m.compacted.WithLabelValues(what).Add(float64(res.Applied))
		if res.Next == "" {
			break
		}
		after = res.Next
	}
	return total
}
