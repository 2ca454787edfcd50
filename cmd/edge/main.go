// Command edge is the Outpost edge gateway: an MQTT broker (embedded, or an
// external one), durable ingest into bbolt, and the mini-program HTTP API.
//
// main only wires: flags and config → start the edge (pkg/edge) → run until
// SIGINT or SIGTERM → the edge's ordered shutdown within the grace period.
// -check-config validates and prints the configuration instead.
package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/outpost-edge/outpost/pkg/config"
	"github.com/outpost-edge/outpost/pkg/edge"
	"github.com/outpost-edge/outpost/pkg/obs"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "hash-password" {
		os.Exit(hashPassword())
	}
	os.Exit(run())
}

func run() int {
	cfg, err := edge.Parse(os.Args[1:], os.Stderr)
	if errors.Is(err, edge.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "edge: %v\n", err)
		return 2
	}
	if cfg.CheckConfig {
		for _, n := range cfg.Notices() {
			fmt.Fprintf(os.Stderr, "%s: warning: %s\n", "edge", n)
		}
		if err := config.Print(os.Stdout, cfg.Masked()); err != nil {
			fmt.Fprintf(os.Stderr, "edge: %v\n", err)
			return 1
		}
		return 0
	}
	log, level, err := obs.NewLogger(os.Stderr, cfg.LogLevel)
	if err != nil {
		fmt.Fprintf(os.Stderr, "edge: %v\n", err)
		return 2
	}
	// Every development convenience and weak credential in force, one WARN
	// line each, before anything listens.
	for _, n := range cfg.Notices() {
		log.Warn(n.Msg, "key", n.Key)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	e, err := edge.Start(ctx, cfg, log, level)
	if err != nil {
		log.Error("edge stopped", "err", err)
		fmt.Fprintf(os.Stderr, "edge: %v\n", err)
		return 1
	}
	runErr := e.Run(ctx)
	stop() // a second signal now kills the process the default way

	// The whole stop is bounded by the grace period: an edge that cannot
	// stop in time exits non-zero rather than hang its supervisor.
	start := time.Now()
	watchdog := time.AfterFunc(cfg.ShutdownGrace, func() {
		log.Error("shutdown did not finish within the grace period; exiting", "grace", cfg.ShutdownGrace)
		os.Exit(1)
	})
	shutErr := e.Shutdown(cfg.ShutdownGrace)
	watchdog.Stop()
	if err := errors.Join(runErr, shutErr); err != nil {
		log.Error("edge stopped", "err", err)
		fmt.Fprintf(os.Stderr, "edge: %v\n", err)
		return 1
	}
	log.Info("edge stopped cleanly", "took", time.Since(start).Round(time.Millisecond))
	return 0
}

// hashPassword reads a device password on stdin and prints its bcrypt hash
// for mqtt.devices in the config.
func hashPassword() int {
	line, err := bufio.NewReader(os.Stdin).ReadString('\n')
	if err != nil && line == "" {
		fmt.Fprintln(os.Stderr, "edge hash-password: type the password on stdin")
		return 2
	}
	h, err := bcrypt.GenerateFromPassword([]byte(strings.TrimRight(line, "\r\n")), bcrypt.DefaultCost)
	if err != nil {
		fmt.Fprintf(os.Stderr, "edge hash-password: %v\n", err)
		return 1
	}
	fmt.Fprintln(os.Stdout, string(h))
	return 0
}
