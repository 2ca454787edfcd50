package httpapi

import (
	"context"
	"encoding/json"
	"errors"
	"math"

	"github.com/gofiber/fiber/v2"

	uauth "github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/cloud/service"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// The application layer as the handlers use it, in the groups they use it;
// *service.Service satisfies Service. Tests serve the routes over a fake.

// Leadership says where writes run and confirms strong reads.
type Leadership interface {
	IsLeader() bool
	Leader() (id, httpAddr string, ok bool)
	Barrier(ctx context.Context) error
}

// Membership is the cluster endpoints' side of the service.
type Membership interface {
	AppliedIndex() uint64
	Status(ctx context.Context) (service.Status, error)
	Join(ctx context.Context, id, raftAddr, httpAddr string) error
	Remove(ctx context.Context, id string) error
	Snapshot(ctx context.Context) (appliedIndex uint64, err error)
}

// Sync is the edge-facing sync API's side of the service. Push and State
// take ownership of their batch.
type Sync interface {
	// Admit admits edge's write of size body bytes into the apply queue
	// before it is decoded, waiting a bounded time for room (ErrOverloaded
	// when there is none); the write is proposed with the returned context,
	// and release is called when the request ends.
	Admit(ctx context.Context, edge string, size int) (_ context.Context, release func(), _ error)
	Push(ctx context.Context, edge string, b *wire.PushBatch) (service.PushOutcome, error)
	State(ctx context.Context, edge string, b *wire.StateBatch) (service.StateOutcome, error)
	Pull(ctx context.Context, edge string, req service.PullRequest) (wire.PullPage, error)
	// AwaitPull holds a pull on a follower until its replica has something
	// for the edge (true) or the wait ends (false).
	AwaitPull(ctx context.Context, edge string, req service.PullRequest) bool
	Heartbeat(ctx context.Context, edge string, h *wire.Heartbeat) (wire.HeartbeatResult, error)
}

// Sessions is users' login, refresh and revocation.
type Sessions interface {
	Login(ctx context.Context, code string) (uauth.Pair, error)
	Refresh(ctx context.Context, refreshToken string) (uauth.Pair, error)
	RevokeSessions(ctx context.Context, openid string) (service.Revocation, error)
}

// Consumer is the consumer API's reads and writes.
type Consumer interface {
	Device(ctx context.Context, id string) (*fsm.Device, error)
	Readings(ctx context.Context, q fsm.ReadingsQuery) ([]fsm.StoredReading, string, error)
	PutDesired(ctx context.Context, id string, state map[string]json.RawMessage) (*fsm.Device, error)
	PutMeta(ctx context.Context, id string, m wire.Meta) (*fsm.Device, error)
	Edges(ctx context.Context) ([]wire.Edge, error)
	Export(ctx context.Context, since string, limit int, emit func(*fsm.ExportRecord) error) (next string, err error)
	User(ctx context.Context, openid string) (*wire.User, error)
	PutUser(ctx context.Context, u wire.User) (wire.User, error)
	Policies(ctx context.Context) ([]wire.Policy, error)
	PutPolicy(ctx context.Context, p wire.Policy) error
}

// Service is everything the routes call.
type Service interface {
	Leadership
	Membership
	Sync
	Sessions
	Consumer
	Rules
	Alerts
}

var _ Service = (*service.Service)(nil)

// serviceStatus answers the service's sentinels that mean the same on every
// route; nil for any other error. Route-specific ones (not found, bad
// cursor, sequence gap, another edge's batch, membership) are answered by
// their handlers, which know what to name in the message. ErrNotLeader is
// not here: onLeader handles it.
func serviceStatus(err error) *httpError {
	retry := func(status, after int, msg string) *httpError {
		return &httpError{status: status, msg: msg, retryAfter: after}
	}
	switch {
	case errors.Is(err, wire.ErrInvalid):
		return invalid(err).(*httpError)
	case errors.Is(err, service.ErrOverloaded):
		// A refusal at once says 1 s; a write that waited out the
		// admission wait, or expired in the queue, gets the queue's
		// estimate of when it has room.
		after := 1
		if oe := (*service.OverloadedError)(nil); errors.As(err, &oe) {
			after = max(1, int(math.Ceil(oe.RetryAfter.Seconds())))
		}
		return retry(fiber.StatusTooManyRequests, after, "cloud is busy applying earlier writes; retry after the Retry-After delay")
	case errors.Is(err, service.ErrUnknownOutcome):
		he := retry(fiber.StatusServiceUnavailable, 1,
			"leadership changed before the write committed; it may or may not have applied — retry (writes are idempotent)")
		he.headers = map[string]string{hdrRetry: "1"}
		return he
	// Login.
	case errors.Is(err, service.ErrDevLoginDisabled):
		return &httpError{status: fiber.StatusBadRequest, msg: "dev login is disabled on the cloud (start cloud-sync with -dev-login for development)"}
	case errors.Is(err, service.ErrBadOpenID):
		return &httpError{status: fiber.StatusBadRequest, msg: "dev login " + badOpenID}
	case errors.Is(err, service.ErrLoginUnavailable):
		return retry(fiber.StatusServiceUnavailable, 30, "login unavailable: the cloud has no WeChat credentials configured")
	case errors.Is(err, service.ErrInvalidCode):
		return &httpError{status: fiber.StatusBadRequest, msg: "invalid or expired login code: call wx.login() again"}
	case errors.Is(err, service.ErrLoginRateLimited):
		return retry(fiber.StatusTooManyRequests, 5, "WeChat is rate limiting logins; retry shortly")
	case errors.Is(err, service.ErrUserBlocked):
		return &httpError{status: fiber.StatusForbidden, msg: "this WeChat user is blocked from logging in"}
	case errors.Is(err, service.ErrWeChatUnavailable):
		return retry(fiber.StatusServiceUnavailable, 30, "login unavailable: WeChat cannot be reached from the cloud; existing sessions keep working")
	// Refresh: the messages edges match (wire.MsgRefresh*).
	case errors.Is(err, service.ErrRefreshUnknown):
		return &httpError{status: fiber.StatusUnauthorized, msg: wire.MsgRefreshUnknown}
	case errors.Is(err, service.ErrRefreshExpired):
		return &httpError{status: fiber.StatusUnauthorized, msg: wire.MsgRefreshExpired}
	case errors.Is(err, service.ErrRefreshReused):
		return &httpError{status: fiber.StatusUnauthorized, msg: wire.MsgRefreshReused}
	case errors.Is(err, service.ErrRefreshRevoked):
		return &httpError{status: fiber.StatusUnauthorized, msg: wire.MsgRefreshRevoked}
	}
	return nil
}
