package cloud

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/outpost-edge/outpost/pkg/backoff"
	"github.com/outpost-edge/outpost/pkg/certs"
	"github.com/outpost-edge/outpost/pkg/cloud/auth"
	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/cloud/httpapi"
	"github.com/outpost-edge/outpost/pkg/cloud/raftnode"
	"github.com/outpost-edge/outpost/pkg/cloud/service"
	"github.com/outpost-edge/outpost/pkg/cloud/sinks"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/obs"
	"github.com/outpost-edge/outpost/pkg/wechat"
)

// Node is a running cloud-sync node.
type Node struct {
	cfg  Config
	log  *slog.Logger
	fsm  *fsm.FSM
	bkm  *bucketMetrics
	raft *raftnode.Node
	svc  *service.Service
	http *httpapi.Server
	// sinks publishes the export log while this node leads.
	sinks *sinks.Manager
	ln    net.Listener
	// peerTLS is how this node calls members' HTTP ports (join); nil:
	// plain HTTP.
	peerTLS *tls.Config
}

// Start binds the node's ports and starts raft; it returns an error (and
// holds nothing open) on a bad data dir or a busy port.
func Start(cfg Config, log *slog.Logger) (*Node, error) {
	sec, err := loadTransportSecurity(cfg)
	if err != nil {
		return nil, err
	}
	if sec.cluster == nil {
		log.Warn("cluster TLS is off: raft and node-to-node HTTP are unauthenticated (development mode; the raft address must be loopback)",
			"raft", cfg.Raft, "enable", "-cluster-ca, -cluster-cert and -cluster-key")
	}
	if err := os.MkdirAll(cfg.Data, 0o700); err != nil {
		return nil, fmt.Errorf("data dir %s: %w", cfg.Data, err)
	}
	ln, err := net.Listen("tcp", cfg.HTTP)
	if err != nil {
		return nil, fmt.Errorf("http listen on %s: %w", cfg.HTTP, err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	obs.RegisterBuildInfo(reg, "cloud-sync")
	fm := newFSMMetrics(reg)
	bkm := newBucketMetrics(reg)
	state, err := fsm.Open(filepath.Join(cfg.Data, "state.db"), log, fm.Hooks())
	if err != nil {
		_ = ln.Close()
		return nil, err
	}
	clock := hlc.NewClock(nil, cfg.MaxClockDrift)
	clock.Restore(state.MaxStamp())
	rn, err := raftnode.New(raftnode.Config{
		ID: cfg.ID, RaftBind: cfg.Raft, RaftAdvertise: cfg.RaftAdvertise, HTTPAdvertise: cfg.HTTPAdvertise,
		DataDir: cfg.Data, Bootstrap: cfg.Bootstrap,
		HeartbeatTimeout: cfg.HeartbeatTimeout, LeaderHeartbeatTimeout: cfg.LeaderHeartbeatTimeout, ElectionTimeout: cfg.ElectionTimeout,
		LeaderLeaseTimeout: cfg.LeaderLeaseTimeout, CommitTimeout: cfg.CommitTimeout,
		SnapshotInterval: cfg.SnapshotInterval, SnapshotThreshold: cfg.SnapshotThreshold, TrailingLogs: cfg.TrailingLogs,
		MaxEntryBytes: cfg.MaxEntryBytes, MaxInflightEntries: cfg.MaxInflightEntries, GroupCommitWait: cfg.GroupCommitWait, MaxPendingBytes: cfg.MaxPendingBytes,
		MaxQueueDelay: cfg.MaxQueueDelay, AdmitWait: cfg.AdmitWait,
		DialOverrides: cfg.RaftDial, RaftLogLevel: cfg.RaftLogLevel, TLS: sec.cluster,
	}, state, clock, log, reg)
	if err != nil {
		_ = state.Close()
		_ = ln.Close()
		return nil, err
	}
	static, err := auth.NewStatic(cfg.EdgeTokens, cfg.APIToken)
	if err != nil {
		_ = rn.Shutdown()
		_ = state.Close()
		_ = ln.Close()
		return nil, fmt.Errorf("%w: %v", ErrUsage, err)
	}
	if !static.HasAPIToken() {
		msg := "no -api-token: the consumer API refuses every request"
		if sec.cluster == nil {
			msg += ", and so do membership changes (no cluster credential is configured)"
		}
		log.Warn(msg)
	}
	scfg := service.Config{HeartbeatFresh: cfg.HeartbeatFresh, PullHold: cfg.PullHold, DevLogin: cfg.DevLogin, Admins: cfg.Admins,
		AccessTTL: cfg.AccessTTL, RefreshTTL: cfg.RefreshTTL, RefreshReuseGrace: cfg.RefreshReuseGrace, MaxOffline: cfg.MaxOffline,
		Retention: cfg.Retention, LogRetention: cfg.LogRetention}
	for _, sk := range cfg.Export.Sinks {
		// The export log keeps what any configured sink has not taken.
		scfg.Sinks = append(scfg.Sinks, sk.Name)
	}
	if cfg.WeChatAppID != "" {
		// Set only when configured: a nil *wechat.Client in the interface
		// would read as configured.
		wc, err := wechat.New(wechat.Config{AppID: cfg.WeChatAppID, Secret: cfg.WeChatSecret, APIBase: cfg.WeChatAPIBase})
		if err != nil {
			_ = rn.Shutdown()
			_ = state.Close()
			_ = ln.Close()
			return nil, fmt.Errorf("%w: wechat: %v", ErrUsage, err)
		}
		scfg.WeChat = wc
		if cfg.WeChatSubscribeTemplate != "" {
			scfg.Notifier = wechatNotifier{c: wc, template: cfg.WeChatSubscribeTemplate}
		}
	} else if cfg.WeChatSubscribeTemplate != "" {
		log.Warn("wechat_subscribe_template is set without wechat_appid: alert notifications stay queued")
	}
	svc := service.New(scfg, rn, state, clock, log, reg)
	exp := sinks.New(cfg.Export, rn, state, log, reg, nil)
	// Static tokens first (edges and the API token), then users' access
	// tokens signed with the deployment key.
	srv, err := httpapi.New(httpapi.Config{NodeID: cfg.ID, PullHold: cfg.PullHold, AuthFailureLimit: cfg.AuthFailureLimit, PeerTLS: sec.peer,
		HasAPIToken: static.HasAPIToken(), ClusterTLS: sec.cluster != nil, MetricsToken: cfg.MetricsToken,
		TrustedProxies: cfg.TrustedProxies, MaxConns: cfg.MaxConns, MaxConnsPerIP: cfg.MaxConnsPerIP, TLS: sec.http,
		Sinks: exp},
		svc, auth.Chain{static, svc}, log, reg)
	if err != nil {
		_ = rn.Shutdown()
		_ = state.Close()
		_ = ln.Close()
		return nil, err
	}
	return &Node{cfg: cfg, log: log, fsm: state, bkm: bkm, raft: rn, svc: svc, http: srv, sinks: exp, ln: ln, peerTLS: sec.peer}, nil
}

// transportSecurity is the TLS a node runs with, loaded from its files.
type transportSecurity struct {
	cluster *certs.Cluster // nil: no cluster TLS (loopback development)
	http    *tls.Config    // the HTTP port's; nil: plain HTTP
	peer    *tls.Config    // calling other nodes' HTTP ports; nil: plain HTTP
}

// loadTransportSecurity reads the -cluster-* and -tls-* files. The HTTP
// port serves TLS when either is set: members reach each other's HTTP
// ports with their cluster certificates (see package certs).
func loadTransportSecurity(cfg Config) (transportSecurity, error) {
	var sec transportSecurity
	var public *tls.Certificate
	if cfg.TLSCert != "" {
		c, err := certs.LoadKeyPair(cfg.TLSCert, cfg.TLSKey)
		if err != nil {
			return sec, fmt.Errorf("%w: tls_cert: %v", ErrUsage, err)
		}
		public = &c
	}
	if cfg.ClusterTLS() {
		cl, err := certs.LoadCluster(cfg.ClusterCA, cfg.ClusterCert, cfg.ClusterKey)
		if err != nil {
			return sec, fmt.Errorf("%w: %v", ErrUsage, err)
		}
		sec.cluster, sec.peer = cl, cl.ClientConfig()
	}
	if public == nil && sec.cluster == nil {
		return sec, nil
	}
	var err error
	if sec.http, err = certs.HTTPServerConfig(public, sec.cluster); err != nil {
		return sec, fmt.Errorf("%w: %v", ErrUsage, err)
	}
	if sec.peer == nil {
		if sec.peer, err = certs.PeerConfig(*public); err != nil {
			return sec, fmt.Errorf("%w: %v", ErrUsage, err)
		}
	}
	return sec, nil
}

// Run serves until ctx ends or serving fails.
func (n *Node) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 3)
	raftDone := make(chan struct{})
	go func() { defer close(raftDone); n.raft.Run(ctx) }()
	go func() { errc <- n.http.Serve(n.ln) }()
	maintDone := make(chan struct{})
	go func() { defer close(maintDone); n.svc.RunMaintenance(ctx, 0) }()
	liveDone := make(chan struct{})
	go func() { defer close(liveDone); n.svc.RunLiveness(ctx) }()
	retainDone := make(chan struct{})
	go func() { defer close(retainDone); n.svc.RunRetention(ctx) }()
	notifyDone := make(chan struct{})
	go func() { defer close(notifyDone); n.svc.RunNotify(ctx, 0) }()
	statsDone := make(chan struct{})
	go func() { defer close(statsDone); n.bkm.run(ctx, n.fsm, bucketStatsEvery, n.log) }()
	sinksDone := make(chan struct{})
	go func() { defer close(sinksDone); n.sinks.Run(ctx) }()
	joinDone := make(chan struct{})
	go func() {
		defer close(joinDone)
		if len(n.cfg.Join) > 0 {
			if err := n.joinLoop(ctx); err != nil {
				errc <- err
			}
		}
	}()
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
	}
	cancel()
	<-joinDone
	<-maintDone
	<-liveDone
	<-retainDone
	<-notifyDone
	<-statsDone
	<-sinksDone
	<-raftDone
	return err
}

// Shutdown stops HTTP first (no new writes), then raft, then the state.
func (n *Node) Shutdown(timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	httpErr := n.http.Shutdown(ctx)
	// fasthttp's shutdown does nothing if the listener was not registered
	// yet (a signal right after start); closing it ends Serve either way.
	_ = n.ln.Close()
	errs := []error{httpErr, n.raft.Shutdown(), n.fsm.Close()}
	return errors.Join(errs...)
}

// joinLoop asks the cluster (through any listed member) to add this node,
// retrying with jittered backoff until a member accepts; a 4xx (conflict,
// bad token) is fatal because retrying cannot fix it.
func (n *Node) joinLoop(ctx context.Context) error {
	body, _ := json.Marshal(httpapi.JoinRequest{ID: n.cfg.ID, RaftAddr: n.cfg.RaftAdvertise, HTTPAddr: n.cfg.HTTPAdvertise})
	hc := &http.Client{Timeout: 15 * time.Second, Transport: &http.Transport{TLSClientConfig: n.peerTLS}}
	defer hc.CloseIdleConnections()
	bo := backoff.Backoff{Base: 100 * time.Millisecond, Max: 5 * time.Second}
	for i := 0; ; i++ {
		u := strings.TrimRight(n.cfg.Join[i%len(n.cfg.Join)], "/") + "/cluster/v1/join"
		req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(body))
		if err != nil {
			return fmt.Errorf("join: %w", err)
		}
		req.Header.Set("Content-Type", "application/json")
		if n.cfg.APIToken != "" {
			req.Header.Set("Authorization", "Bearer "+n.cfg.APIToken)
		}
		resp, err := hc.Do(req)
		if err == nil {
			var env struct {
				Message string `json:"message"`
			}
			_ = json.NewDecoder(resp.Body).Decode(&env)
			resp.Body.Close()
			switch {
			case resp.StatusCode == http.StatusOK:
				n.log.Info("joined cluster", "via", u)
				return nil
			case resp.StatusCode >= 400 && resp.StatusCode < 500:
				return fmt.Errorf("join via %s refused (%d): %s", u, resp.StatusCode, env.Message)
			}
			n.log.Warn("join not accepted yet; retrying", "via", u, "status", resp.StatusCode, "message", env.Message)
		} else if ctx.Err() == nil {
			n.log.Warn("join: member unreachable; retrying", "via", u, "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(bo.Next()):
		}
	}
}
