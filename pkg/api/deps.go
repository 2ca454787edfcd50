package api

import (
	"context"
	"encoding/json"
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/policy"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Store is what the handlers read and write.
type Store interface {
	Device(id string) (*store.Device, error)
	Devices(after string, fn func(*store.Device) bool) error
	Readings(device string, q store.ReadingsQuery) (store.ReadingsPage, error)
	Latest(device string) (store.Reading, error)
	Stats(device, metric string, from, to, step int64) ([]store.StatsBucket, error)
	// The writes record who made them (store.Actor: the caller and the
	// access token presented), which the cloud verifies before accepting
	// the change (edge restriction).
	SetDesiredBy(id string, patch map[string]json.RawMessage, by store.Actor) (*store.Device, error)
	SetMetaBy(id string, meta store.DeviceMeta, by store.Actor) (*store.Device, error)
	PutUserBy(u store.User, by store.Actor) error
	User(openid string) (*store.User, error)
	Counts() store.Counts
	OldestUnsynced() (hlc.Timestamp, error)
}

// Tokens issues and verifies user credentials.
type Tokens interface {
	Issue(ctx context.Context, openid string) (auth.Pair, error)
	Refresh(ctx context.Context, refreshToken string) (auth.Pair, error)
	Verify(accessToken string) (auth.Claims, error)
}

// RevocationChecker is implemented by Tokens whose sessions can be revoked
// after a token was verified (auth.Service: a reused refresh token, logout;
// a joined edge also learns the cloud's revocations through sync): the
// server asks it on every request, including those whose
// token it serves from the verified-token cache, so a revocation applies at
// once rather than after the cache's TTL. It must be cheap.
type RevocationChecker interface {
	Revoked(c auth.Claims) bool
}

// Login exchanges a mini-program login code for an openid (WeChat
// code2session, or the cloud forwarding it). Nil when not configured.
type Login interface {
	Login(ctx context.Context, code string) (auth.Pair, error)
}

// Authorizer decides requests by policy.
type Authorizer interface {
	Decide(ctx context.Context, in policy.Input) (policy.Decision, error)
}

// Downlink publishes messages to devices.
type Downlink interface {
	Publish(topic string, payload []byte, retain bool, qos byte) error
}

// SyncStatus describes the cloud link for GET /api/v1/edge. Nil on a
// standalone edge.
type SyncStatus interface {
	// Status reports whether the last exchange with the cloud succeeded,
	// and when the last successful one was (zero if never).
	Status() (connected bool, lastSync time.Time)
}

// Directory is the edge directory the nearest-edge query ranks
// (wire.Nearest): the copy the syncer last pulled from the cloud, served
// offline too. Nil on a standalone edge.
type Directory interface {
	Edges(ctx context.Context) ([]wire.Edge, error)
}

// Presence reports which devices hold an MQTT connection to the embedded
// broker (pkg/broker: from its connect and disconnect events; a Will is
// sent only on a disconnect). Nil in external-broker mode, where a device
// counts as online if it was seen within Config.OnlineWindow.
type Presence interface {
	Online(device string) bool
}

// Deps are the parts the API is built on.
type Deps struct {
	Store     Store
	Tokens    Tokens
	Login     Login
	Policy    Authorizer
	Downlink  Downlink
	Sync      SyncStatus
	Directory Directory
	Presence  Presence
	Rules     Rules
	Alerts    Alerts
	// Live serves phones' MQTT sessions at /mqtt (pkg/broker); nil: /mqtt
	// answers 404.
	Live       Live
	Ready      func() string // "" when ready, else why not
	Registerer prometheus.Registerer
	Gatherer   prometheus.Gatherer
	// DataChanged is called after roles or device ownership change, so
	// cached policy decisions are dropped.
	DataChanged func()
}

func (d *Deps) check() error {
	switch {
	case d.Store == nil:
		return errors.New("api: store is required")
	case d.Tokens == nil:
		return errors.New("api: token service is required")
	case d.Policy == nil:
		return errors.New("api: policy engine is required")
	}
	if d.Gatherer == nil {
		d.Gatherer = prometheus.NewRegistry()
	}
	return nil
}
