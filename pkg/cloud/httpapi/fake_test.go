package httpapi

import (
	"context"
	"encoding/json"
	"sync"

	uauth "github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/cloud/raftnode"
	"github.com/outpost-edge/outpost/pkg/cloud/service"
	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// fakeService is the application layer as a test scripts it: err, when
// set, is what every call returns; the named funcs override single methods.
// It records the calls the routes made.
type fakeService struct {
	follower   bool // IsLeader answers false
	leaderID   string
	leaderAddr string
	err        error

	// admit decides admission by body size; the context it returns is
	// what the write must be proposed with, release is recorded.
	admit   func(ctx context.Context, size int) (context.Context, func(), error)
	push    func(edge string, b *wire.PushBatch) (service.PushOutcome, error)
	pushCtx func(ctx context.Context) // sees the context Push was called with
	export  func(emit func(*fsm.ExportRecord) error) (string, error)
	pull    func(ctx context.Context, edge string, req service.PullRequest) (wire.PullPage, error)

	mu       sync.Mutex
	calls    []string
	lastEdge string
}

var _ Service = (*fakeService)(nil)

func (f *fakeService) called(name, edge string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, name)
	if edge != "" {
		f.lastEdge = edge
	}
}

func (f *fakeService) Calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

func (f *fakeService) IsLeader() bool { return !f.follower }
func (f *fakeService) Leader() (string, string, bool) {
	if f.follower {
		return f.leaderID, f.leaderAddr, f.leaderID != ""
	}
	return "n1", "127.0.0.1:1", true
}
func (f *fakeService) Barrier(context.Context) error { f.called("Barrier", ""); return f.err }
func (f *fakeService) AppliedIndex() uint64          { return 42 }
func (f *fakeService) Status(context.Context) (service.Status, error) {
	f.called("Status", "")
	return service.Status{ID: "n1", Leader: "n1", Nodes: []raftnode.NodeStatus{
		{ID: "n1", RaftAddr: "10.0.0.7:7000", HTTPAddr: "10.0.0.7:8090", Suffrage: "voter", State: "leader"}}}, f.err
}
func (f *fakeService) Join(context.Context, string, string, string) error {
	f.called("Join", "")
	return f.err
}
func (f *fakeService) Remove(context.Context, string) error { f.called("Remove", ""); return f.err }
func (f *fakeService) Snapshot(context.Context) (uint64, error) {
	f.called("Snapshot", "")
	return 42, f.err
}
func (f *fakeService) Admit(ctx context.Context, _ string, size int) (context.Context, func(), error) {
	if f.admit != nil {
		return f.admit(ctx, size)
	}
	return ctx, func() {}, nil
}
func (f *fakeService) Push(ctx context.Context, edge string, b *wire.PushBatch) (service.PushOutcome, error) {
	f.called("Push", edge)
	if f.pushCtx != nil {
		f.pushCtx(ctx)
	}
	if f.push != nil {
		return f.push(edge, b)
	}
	return service.PushOutcome{PushResult: wire.PushResult{AckedSeq: b.LastSeq()}}, f.err
}
func (f *fakeService) State(_ context.Context, edge string, _ *wire.StateBatch) (service.StateOutcome, error) {
	f.called("State", edge)
	return service.StateOutcome{}, f.err
}
func (f *fakeService) Pull(ctx context.Context, edge string, req service.PullRequest) (wire.PullPage, error) {
	f.called("Pull", edge)
	if f.pull != nil {
		return f.pull(ctx, edge, req)
	}
	return wire.PullPage{}, f.err
}
func (f *fakeService) AwaitPull(ctx context.Context, edge string, _ service.PullRequest) bool {
	f.called("AwaitPull", edge)
	return true
}
func (f *fakeService) Heartbeat(_ context.Context, edge string, _ *wire.Heartbeat) (wire.HeartbeatResult, error) {
	f.called("Heartbeat", edge)
	return wire.HeartbeatResult{}, f.err
}
func (f *fakeService) Login(_ context.Context, code string) (uauth.Pair, error) {
	f.called("Login", "")
	return uauth.Pair{AccessToken: "a", RefreshToken: "r", OpenID: code}, f.err
}
func (f *fakeService) Refresh(context.Context, string) (uauth.Pair, error) {
	f.called("Refresh", "")
	return uauth.Pair{AccessToken: "a2", RefreshToken: "r2"}, f.err
}
func (f *fakeService) RevokeSessions(_ context.Context, openid string) (service.Revocation, error) {
	f.called("RevokeSessions", "")
	return service.Revocation{OpenID: openid, Sessions: 2, BeforeMs: 1000}, f.err
}
func (f *fakeService) Device(_ context.Context, id string) (*fsm.Device, error) {
	f.called("Device", "")
	return &fsm.Device{ID: id}, f.err
}
func (f *fakeService) Readings(context.Context, fsm.ReadingsQuery) ([]fsm.StoredReading, string, error) {
	f.called("Readings", "")
	return []fsm.StoredReading{}, "", f.err
}
func (f *fakeService) PutDesired(_ context.Context, id string, _ map[string]json.RawMessage) (*fsm.Device, error) {
	f.called("PutDesired", "")
	return &fsm.Device{ID: id}, f.err
}
func (f *fakeService) PutMeta(_ context.Context, id string, _ wire.Meta) (*fsm.Device, error) {
	f.called("PutMeta", "")
	return &fsm.Device{ID: id}, f.err
}
func (f *fakeService) Edges(context.Context) ([]wire.Edge, error) {
	f.called("Edges", "")
	return []wire.Edge{}, f.err
}
func (f *fakeService) Export(_ context.Context, _ string, _ int, emit func(*fsm.ExportRecord) error) (string, error) {
	f.called("Export", "")
	if f.export != nil {
		return f.export(emit)
	}
	return "", f.err
}
func (f *fakeService) User(_ context.Context, openid string) (*wire.User, error) {
	f.called("User", "")
	return &wire.User{OpenID: openid}, f.err
}
func (f *fakeService) PutUser(_ context.Context, u wire.User) (wire.User, error) {
	f.called("PutUser", "")
	return u, f.err
}
func (f *fakeService) Policies(context.Context) ([]wire.Policy, error) {
	f.called("Policies", "")
	return []wire.Policy{}, f.err
}
func (f *fakeService) PutPolicy(context.Context, wire.Policy) error {
	f.called("PutPolicy", "")
	return f.err
}

func (f *fakeService) Rules(context.Context) ([]service.CloudRule, error) {
	f.called("Rules", "")
	return []service.CloudRule{}, f.err
}
func (f *fakeService) PutRule(_ context.Context, r rules.Rule, region string) (service.CloudRule, error) {
	f.called("PutRule", "")
	return service.CloudRule{Rule: r, Region: region}, f.err
}
func (f *fakeService) DeleteRule(context.Context, string) error {
	f.called("DeleteRule", "")
	return f.err
}

func (f *fakeService) PushAlerts(_ context.Context, _ string, b *wire.AlertBatch) (wire.AlertResult, error) {
	f.called("PushAlerts", "")
	return wire.AlertResult{Applied: len(b.Alerts)}, f.err
}
func (f *fakeService) Alerts(context.Context, fsm.AlertsQuery) ([]fsm.AlertRecord, error) {
	f.called("Alerts", "")
	return []fsm.AlertRecord{}, f.err
}
func (f *fakeService) AckAlert(_ context.Context, id, _ string) (fsm.AlertRecord, error) {
	f.called("AckAlert", id)
	return fsm.AlertRecord{}, f.err
}
