package edge

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/pkg/api"
	"github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/auth/federation"
	"github.com/outpost-edge/outpost/pkg/certs"
	"github.com/outpost-edge/outpost/pkg/cloud/client"
	"github.com/outpost-edge/outpost/pkg/policy"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/syncer"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// cloudPolicyDir returns the policy directory of an edge joined to a cloud:
// {data}/policies-active, which the syncer fills with the cloud's modules
// once the cloud distributes any. Until then (and on first start) it holds a
// copy of the local policies, so a joined edge authorises exactly like a
// standalone one while the cloud has nothing to say, and keeps the cloud's
// last policies across an offline restart.
func cloudPolicyDir(local, data string) (string, error) {
	dir := filepath.Join(data, "policies-active")
	if _, err := os.Stat(filepath.Join(dir, policy.InstalledMarker)); err == nil {
		return dir, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("policy dir: %w", err)
	}
	entries, err := os.ReadDir(local)
	if err != nil {
		return "", fmt.Errorf("policy dir: %w", err)
	}
	for _, e := range entries {
		n := e.Name()
		if e.IsDir() || !strings.HasSuffix(n, ".rego") || strings.HasSuffix(n, "_test.rego") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(local, n))
		if err != nil {
			return "", fmt.Errorf("policy dir: %w", err)
		}
		if err := os.WriteFile(filepath.Join(dir, n), b, 0o644); err != nil {
			return "", fmt.Errorf("policy dir: %w", err)
		}
	}
	return dir, nil
}

// localModules reads the edge's own policy modules (the configured
// directory, or the built-in policies written out): what a joined edge
// enforces while the cloud distributes no policies.
func localModules(dir string) ([]policy.Module, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("policy dir: %w", err)
	}
	var out []policy.Module
	for _, e := range entries {
		n := e.Name()
		if e.IsDir() || !strings.HasSuffix(n, ".rego") || strings.HasSuffix(n, "_test.rego") || strings.HasPrefix(n, ".") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, n))
		if err != nil {
			return nil, fmt.Errorf("policy dir: %w", err)
		}
		out = append(out, policy.Module{Name: n, Source: string(b)})
	}
	return out, nil
}

// newSyncer builds the syncer and the identity service of an edge joined to
// a cloud.
func newSyncer(cfg Config, now func() time.Time, st *store.Store, tokens *auth.Service, local api.Login, downlink api.Downlink,
	policies syncer.Policies, builtin []policy.Module, cloudRules syncer.Rules, dataChanged func(), reg prometheus.Registerer, log *slog.Logger) (*syncer.Syncer, *federation.Identity, error) {
	tc, err := certs.ClientConfig(cfg.Cloud.CA)
	if err != nil {
		return nil, nil, fmt.Errorf("cloud.ca: %w", err)
	}
	cl, err := client.New(cfg.Cloud.URLs, cfg.Cloud.Token, client.WithRounds(2), client.WithTLSConfig(tc))
	if err != nil {
		return nil, nil, fmt.Errorf("cloud: %w", err)
	}
	var loc *wire.Location
	if lat, lng, ok, _ := ParseLocation(cfg.Location); ok {
		loc = &wire.Location{Lat: lat, Lng: lng}
	}
	sy, err := syncer.New(syncer.Config{
		EdgeID: cfg.ID, Region: cfg.Region, Location: loc, Advertise: cfg.Advertise,
		BatchReadings: cfg.Cloud.BatchReadings, BackoffMax: cfg.Cloud.BackoffMax, MaxOffline: cfg.Cloud.MaxOffline,
		AfterAck: crashAfterAcks(cfg.UnsafeCrashAfterPush, log), Now: now,
		Logger: log.With("component", "sync"), Registerer: reg,
	}, syncer.Deps{Store: st, Client: cl, Keys: tokens.Keys(), Downlink: downlink, Policies: policies,
		BuiltinPolicies: builtin, Rules: cloudRules, DataChanged: dataChanged})
	if err != nil {
		return nil, nil, err
	}
	id, err := federation.New(federation.Config{Local: tokens, Cloud: cl, Fallback: local, Revocations: sy.Revocations(),
		Logger: log.With("component", "identity")})
	if err != nil {
		return nil, nil, err
	}
	return sy, id, nil
}

// crashAfterAcks is the -unsafe-crash-after-push hook (nil when n is 0):
// after the cloud acknowledged n pushes, it kills the process with SIGKILL
// before the syncer records the nth acknowledgement. TESTING ONLY: it proves
// that a crash in that window neither loses nor duplicates anything.
func crashAfterAcks(n int, log *slog.Logger) func(ackedSeq uint64) {
	if n <= 0 {
		return nil
	}
	var acks atomic.Int64
	return func(ackedSeq uint64) {
		if acks.Add(1) < int64(n) {
			return
		}
		log.Warn("TESTING ONLY: killing the process between the cloud's ack and recording it", "acked_seq", ackedSeq)
		_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // SIGKILL cannot be handled; never let the ack be recorded
	}
}
