package api

import (
	"strconv"
	"time"

	"github.com/outpost-edge/outpost/pkg/ident"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Query parameters shared with the cloud (times, limits, cursors,
// coordinates) are parsed by pkg/wire; its errors wrap wire.ErrBadParam and
// handlers answer them 400. Only the edge's own ones are here.

// parseStep reads a stats period as a Go duration ("5m") or milliseconds.
func parseStep(s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		if n < 1 {
			return 0, wire.BadParam("step", "must be at least 1 ms")
		}
		return n, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, wire.BadParam("step", "%q is neither milliseconds nor a duration like 5m", truncate(s))
	}
	if d < time.Millisecond {
		return 0, wire.BadParam("step", "must be at least 1ms")
	}
	return d.Milliseconds(), nil
}

// validMetric matches metric names as the ingest decoder accepts them.
func validMetric(s string) bool { return ident.Valid(s, 64) }

func truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}
