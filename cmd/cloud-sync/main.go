// Command cloud-sync runs one node of Outpost's raft-replicated cloud: edges
// push their outboxes to it and pull cloud-side changes; consumers read merged
// readings, device shadows and the edge directory, and export changes.
//
// main only wires: flags and config → build the node → run until SIGINT or
// SIGTERM → ordered shutdown within the grace period (stop accepting HTTP and
// drain in-flight requests, close raft and its log, close the state).
// -check-config validates and prints the configuration instead;
// `cloud-sync certs` makes development certificates (see runCerts).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/outpost-edge/outpost/pkg/cloud"
	"github.com/outpost-edge/outpost/pkg/config"
	"github.com/outpost-edge/outpost/pkg/obs"
)

func main() { os.Exit(run()) }

func run() int {
	if len(os.Args) > 1 && os.Args[1] == "certs" {
		return runCerts(os.Args[2:], os.Stdout, os.Stderr)
	}
	cfg, err := cloud.Parse(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "cloud-sync: %s\n", strings.TrimPrefix(err.Error(), cloud.ErrUsage.Error()+": "))
		return 2
	}
	if cfg.CheckConfig {
		for _, n := range cfg.Notices() {
			fmt.Fprintf(os.Stderr, "%s: warning: %s\n", "cloud-sync", n)
		}
		if err := config.Print(os.Stdout, cfg.Masked()); err != nil {
			fmt.Fprintf(os.Stderr, "cloud-sync: %v\n", err)
			return 1
		}
		return 0
	}
	if cfg.GCPercent > 0 && os.Getenv("GOGC") == "" {
		debug.SetGCPercent(cfg.GCPercent)
	}
	if cfg.MemoryLimitMB > 0 && os.Getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(cfg.MemoryLimitMB << 20)
	}
	log, level, err := obs.NewLogger(os.Stderr, cfg.LogLevel)
	if err != nil {
		fmt.Fprintf(os.Stderr, "cloud-sync: %v\n", err)
		return 2
	}
	log = log.With("node", cfg.ID)
	// Every development convenience and weak credential in force, one WARN
	// line each, before anything listens.
	for _, n := range cfg.Notices() {
		log.Warn(n.Msg, "key", n.Key)
	}

	var admin *obs.Admin
	if cfg.Pprof != "" {
		if admin, err = obs.ListenAdmin(cfg.Pprof, level, log); err != nil {
			fmt.Fprintf(os.Stderr, "cloud-sync: %v\n", err)
			return 1
		}
	}
	// Signals are caught before anything starts: a SIGTERM that comes as
	// soon as the node says it listens (a supervisor, a test) must stop it
	// gracefully, not kill it the default way.
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	node, err := cloud.Start(cfg, log)
	if err != nil {
		fmt.Fprintf(os.Stderr, "cloud-sync: %s\n", strings.TrimPrefix(err.Error(), cloud.ErrUsage.Error()+": "))
		if errors.Is(err, cloud.ErrUsage) {
			return 2 // e.g. an unreadable certificate
		}
		return 1
	}
	mode := "bootstrap"
	if len(cfg.Join) > 0 {
		mode = "join " + strings.Join(cfg.Join, ",")
	} else if !cfg.Bootstrap {
		mode = "restart"
	}
	adminAddr := ""
	if admin != nil {
		adminAddr = admin.Addr()
	}
	log.Info("cloud-sync listening", "http", cfg.HTTP, "raft", cfg.Raft, "http_advertise", cfg.HTTPAdvertise,
		"raft_advertise", cfg.RaftAdvertise, "data", cfg.Data, "mode", mode, "admin", adminAddr,
		"cluster_tls", cfg.ClusterTLS(), "https", cfg.HTTPTLS())

	adminCtx, stopAdmin := context.WithCancel(context.Background())
	adminDone := make(chan struct{})
	go func() {
		defer close(adminDone)
		if admin != nil {
			if err := admin.Run(adminCtx); err != nil {
				log.Error("admin listener", "err", err)
			}
		}
	}()
	runErr := node.Run(ctx)
	stop() // a second signal now kills the process the default way

	// The whole stop is bounded by the grace period: a node that cannot
	// close its stores in time exits non-zero rather than hang its
	// supervisor (raft's log and the state are crash-safe either way).
	log.Info("shutting down", "grace", cfg.ShutdownGrace)
	start := time.Now()
	watchdog := time.AfterFunc(cfg.ShutdownGrace, func() {
		log.Error("shutdown did not finish within the grace period; exiting", "grace", cfg.ShutdownGrace)
		os.Exit(1)
	})
	shutErr := node.Shutdown(cfg.ShutdownGrace)
	stopAdmin()
	<-adminDone
	watchdog.Stop()
	if shutErr != nil {
		log.Error("shutdown", "err", shutErr)
	}
	if runErr != nil {
		fmt.Fprintf(os.Stderr, "cloud-sync: %v\n", runErr)
		return 1
	}
	if shutErr != nil {
		return 1
	}
	log.Info("cloud-sync stopped cleanly", "took", time.Since(start).Round(time.Millisecond))
	return 0
}
