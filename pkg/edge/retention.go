package edge

import (
	"context"
	"log/slog"
	"time"

	"github.com/outpost-edge/outpost/pkg/store"
)

// retentionInterval is how often retention runs.
const retentionInterval = time.Minute

// retain prunes, every retentionInterval until ctx ends, the readings older
// than cfg.Ingest.Retention that the cloud already holds (store.Prune keeps
// everything the outbox has not had acknowledged). A standalone edge first
// acknowledges its own outbox (ackStandaloneOutbox).
func retain(ctx context.Context, st *store.Store, cfg Config, log *slog.Logger) {
	t := time.NewTicker(retentionInterval)
	defer t.Stop()
	standalone := len(cfg.Cloud.URLs) == 0
	for {
		if standalone {
			if err := ackStandaloneOutbox(st); err != nil {
				log.Error("trim outbox", "err", err)
			}
		}
		if cfg.Ingest.Retention > 0 {
			cutoff := time.Now().Add(-cfg.Ingest.Retention).UnixMilli()
			res, err := st.Prune(ctx, cutoff)
			if err != nil && ctx.Err() == nil {
				log.Error("retention", "err", err)
			} else if res.Deleted > 0 || res.Unsynced > 0 {
				log.Info("retention", "deleted", res.Deleted, "kept_unsynced", res.Unsynced)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// ackStandaloneOutbox is the rule that a standalone edge is its own cloud:
// the store records every change in the outbox for a cloud to acknowledge,
// and retention deletes only acknowledged readings, so with no cloud to
// acknowledge them nothing would ever be pruned and the outbox would grow
// for good. The edge acknowledges everything in it itself. An edge joined
// to a cloud never calls this: only the cloud's acknowledgement (through
// the syncer) may release a reading.
func ackStandaloneOutbox(st *store.Store) error {
	if c := st.Counts(); c.OutboxBacklog > 0 {
		return st.AckOutbox(c.OutboxHead)
	}
	return nil
}
