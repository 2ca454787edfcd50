package main

import (
	"context"
	"log/slog"
	"os"
	"testing"
	"time"
)

// TestDemoSmoke runs the whole demo on free ports in -check mode: it builds
// the binaries, starts the cluster, both edges and the simulator, runs the
// example requests (login, nearest edge, latest reading, set desired, cloud
// export with both edges' data) and stops everything with SIGTERM, each
// process exiting 0.
func TestDemoSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs six processes")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	o := options{basePort: 0, dir: t.TempDir(), keep: true, check: true, interval: 200 * time.Millisecond}
	if err := run(ctx, o, log); err != nil {
		t.Fatal(err)
	}
}
