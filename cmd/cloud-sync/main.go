// Command cloud-sync runs one node of Outpost's raft-replicated cloud: edges
// push their outboxes to it and pull cloud-side changes; consumers read merged
// readings, device shadows and the edge directory, and export changes.
//
// main only wires: flags and config → build the node → run until SIGINT or
// SIGTERM → ordered shutdown (HTTP, raft, state).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/outpost-edge/outpost/pkg/cloud"
)

func main() { os.Exit(run()) }

func run() int {
	cfg, err := cloud.Parse(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "cloud-sync: %s\n", strings.TrimPrefix(err.Error(), cloud.ErrUsage.Error()+": "))
		return 2
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(cfg.LogLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "cloud-sync: log level %q: %v\n", cfg.LogLevel, err)
		return 2
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})).With("node", cfg.ID)

	node, err := cloud.Start(cfg, log)
	if err != nil {
		fmt.Fprintf(os.Stderr, "cloud-sync: %v\n", err)
		return 1
	}
	mode := "bootstrap"
	if len(cfg.Join) > 0 {
		mode = "join " + strings.Join(cfg.Join, ",")
	} else if !cfg.Bootstrap {
		mode = "restart"
	}
	log.Info("cloud-sync listening", "http", cfg.HTTP, "raft", cfg.Raft, "http_advertise", cfg.HTTPAdvertise,
		"raft_advertise", cfg.RaftAdvertise, "data", cfg.Data, "mode", mode)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	runErr := node.Run(ctx)
	stop()
	log.Info("shutting down")
	if err := node.Shutdown(10 * time.Second); err != nil {
		log.Error("shutdown", "err", err)
	}
	if runErr != nil {
		fmt.Fprintf(os.Stderr, "cloud-sync: %v\n", runErr)
		return 1
	}
	return 0
}
