package federation_test

import (
	"context"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/outpost-edge/outpost/pkg/api"
	"github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/auth/federation"
	"github.com/outpost-edge/outpost/pkg/cloud/client"
	"github.com/outpost-edge/outpost/pkg/policy"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/wechat"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// The edge's API consumes an Identity through these interfaces.
var (
	_ api.Login             = (*federation.Identity)(nil)
	_ api.Tokens            = (*federation.Identity)(nil)
	_ api.RevocationChecker = (*federation.Identity)(nil)
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// reply is the fake cloud's answer to one path.
type reply struct {
	status  int
	message string
	data    any
}

// fakeCloud is an httptest cloud answering login and refresh as told, and
// counting the calls.
type fakeCloud struct {
	srv     *httptest.Server
	login   atomic.Pointer[reply]
	refresh atomic.Pointer[reply]
	calls   atomic.Int64
}

func newFakeCloud(t *testing.T) *fakeCloud {
	t.Helper()
	fc := &fakeCloud{}
	fc.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fc.calls.Add(1)
		var rp *reply
		switch r.URL.Path {
		case wire.PathLogin:
			rp = fc.login.Load()
		case wire.PathRefresh:
			rp = fc.refresh.Load()
		}
		if rp == nil {
			rp = &reply{status: http.StatusNotFound, message: "no such path"}
		}
		data, _ := json.Marshal(rp.data)
		if rp.status == http.StatusTooManyRequests {
			w.Header().Set(wire.HeaderRetryAfter, "2")
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(rp.status)
		_ = json.NewEncoder(w).Encode(wire.Envelope[json.RawMessage]{Code: rp.status, Message: rp.message, Data: data})
	}))
	t.Cleanup(fc.srv.Close)
	return fc
}

// fallback is the edge's own WeChat login, recording whether it was asked.
type fallback struct{ calls atomic.Int64 }

func (f *fallback) Login(_ context.Context, code string) (auth.Pair, error) {
	f.calls.Add(1)
	return auth.Pair{AccessToken: "local-" + code, OpenID: "o-local"}, nil
}

// revoker revokes one session family.
type revoker struct{ family string }

func (r revoker) Revoked(c auth.Claims) bool { return c.Family == r.family }

// env is an edge's real token service (bbolt, keyring on disk) that trusts a
// deployment issuer, and an Identity in front of it talking to cloudURL.
type env struct {
	local    *auth.Service
	cloudKey *auth.Issuer
}

func newEnv(t *testing.T) *env {
	t.Helper()
	dir := t.TempDir()
	db, err := bolt.Open(filepath.Join(dir, "auth.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	keys, err := auth.OpenKeyring(filepath.Join(dir, "keys"), nil)
	if err != nil {
		t.Fatal(err)
	}
	local, err := auth.NewService(keys, db, auth.Config{Issuer: "edge-1", Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	ring, err := auth.NewMemoryKeyring(make([]byte, ed25519.SeedSize), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := keys.SetTrusted(ring.PublicKeys()); err != nil {
		t.Fatal(err)
	}
	return &env{local: local, cloudKey: auth.NewIssuer(ring, auth.IssuerConfig{Issuer: "cloud"})}
}

func (e *env) identity(t *testing.T, cloudURL string, fb federation.Login, rev federation.Revoker) *federation.Identity {
	t.Helper()
	cl, err := client.New([]string{cloudURL}, "edge-token", client.WithRounds(1))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	cfg := federation.Config{Local: e.local, Cloud: cl, Revocations: rev, Timeout: 2 * time.Second, Logger: quiet()}
	if fb != nil {
		cfg.Fallback = fb
	}
	id, err := federation.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// unreachable is the URL of a server that is no longer there.
func unreachable(t *testing.T) string {
	t.Helper()
	srv := httptest.NewServer(http.NotFoundHandler())
	url := srv.URL
	srv.Close()
	return url
}

func TestLoginForwardsToTheCloud(t *testing.T) {
	cloudPair := auth.Pair{AccessToken: "cloud-access", RefreshToken: "cloud-refresh", ExpiresIn: 3600, OpenID: "o-cloud"}
	tests := []struct {
		name         string
		cloud        *reply // nil: the cloud is unreachable
		withFallback bool
		wantErr      error // nil: success
		wantPair     string
		wantFallback bool
	}{
		{"accepted", &reply{status: 200, data: cloudPair}, true, nil, "cloud-access", false},
		{"invalid code", &reply{status: 400, message: "invalid code"}, true, wechat.ErrInvalidCode, "", false},
		{"blocked user", &reply{status: 403, message: "blocked"}, true, wechat.ErrBlocked, "", false},
		{"throttled", &reply{status: 429, message: "busy"}, true, wechat.ErrRateLimited, "", false},
		{"cloud cannot reach WeChat, fallback", &reply{status: 503, message: "wechat unreachable"}, true, nil, "local-c1", true},
		{"cloud cannot reach WeChat, no fallback", &reply{status: 503, message: "wechat unreachable"}, false, auth.ErrLoginUnavailable, "", false},
		{"cloud unreachable, fallback", nil, true, nil, "local-c1", true},
		{"cloud unreachable, no fallback", nil, false, auth.ErrLoginUnavailable, "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			url := unreachable(t)
			if tt.cloud != nil {
				fc := newFakeCloud(t)
				fc.login.Store(tt.cloud)
				url = fc.srv.URL
			}
			fb := &fallback{}
			var login federation.Login
			if tt.withFallback {
				login = fb
			}
			pair, err := e.identity(t, url, login, nil).Login(context.Background(), "c1")
			switch {
			case tt.wantErr != nil && !errors.Is(err, tt.wantErr):
				t.Fatalf("Login: %v, want %v", err, tt.wantErr)
			case tt.wantErr == nil && (err != nil || pair.AccessToken != tt.wantPair):
				t.Fatalf("Login: %+v, %v; want access token %q", pair, err, tt.wantPair)
			}
			if got := fb.calls.Load() > 0; got != tt.wantFallback {
				t.Fatalf("fallback used = %v, want %v", got, tt.wantFallback)
			}
		})
	}
}

// A 4xx the edge has no word for is passed on as the cloud's error, not
// turned into an outage (and the fallback is not asked).
func TestLoginOtherRefusalPassesThrough(t *testing.T) {
	e := newEnv(t)
	fc := newFakeCloud(t)
	fc.login.Store(&reply{status: http.StatusUnauthorized, message: "edge token refused"})
	fb := &fallback{}
	_, err := e.identity(t, fc.srv.URL, fb, nil).Login(context.Background(), "c1")
	var apiErr *client.APIError
	if !errors.As(err, &apiErr) || apiErr.Status != http.StatusUnauthorized || errors.Is(err, auth.ErrLoginUnavailable) || fb.calls.Load() != 0 {
		t.Fatalf("Login: %v (fallback calls %d), want the cloud's 401", err, fb.calls.Load())
	}
}

func TestRefresh(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	cloudSession, sess, err := e.cloudKey.Issue(ctx, "o1")
	if err != nil {
		t.Fatal(err)
	}
	rotated := auth.Pair{AccessToken: "rotated-access", RefreshToken: "rotated-refresh", ExpiresIn: 3600, OpenID: "o1"}

	t.Run("at the cloud", func(t *testing.T) {
		fc := newFakeCloud(t)
		fc.refresh.Store(&reply{status: 200, data: rotated})
		pair, err := e.identity(t, fc.srv.URL, nil, nil).Refresh(ctx, cloudSession.RefreshToken)
		if err != nil || pair != rotated {
			t.Fatalf("Refresh: %+v, %v; want the cloud's rotated pair", pair, err)
		}
	})
	refusals := []struct {
		message string
		want    error
	}{
		{wire.MsgRefreshReused, auth.ErrRefreshReused},
		{wire.MsgRefreshRevoked, auth.ErrRefreshRevoked},
		{wire.MsgRefreshExpired, auth.ErrRefreshExpired},
		{wire.MsgRefreshUnknown, auth.ErrRefreshNotFound},
	}
	for _, r := range refusals {
		t.Run("cloud refuses: "+r.message, func(t *testing.T) {
			// A session of its own: a reused or revoked one is ended at
			// this edge too.
			refused, _, err := e.cloudKey.Issue(ctx, "o1")
			if err != nil {
				t.Fatal(err)
			}
			fc := newFakeCloud(t)
			fc.refresh.Store(&reply{status: http.StatusUnauthorized, message: r.message})
			_, err = e.identity(t, fc.srv.URL, nil, nil).Refresh(ctx, refused.RefreshToken)
			if !errors.Is(err, r.want) {
				t.Fatalf("Refresh: %v, want %v", err, r.want)
			}
		})
	}
	// Offline (unreachable, or a cloud answering 503): the trusted
	// deployment key vouches for the refresh token, and the edge signs an
	// access token with its own key that it accepts itself.
	for name, url := range map[string]func() string{
		"cloud unreachable": func() string { return unreachable(t) },
		"cloud answers 503": func() string {
			fc := newFakeCloud(t)
			fc.refresh.Store(&reply{status: http.StatusServiceUnavailable, message: "no leader"})
			return fc.srv.URL
		},
	} {
		t.Run("offline: "+name, func(t *testing.T) {
			id := e.identity(t, url(), nil, nil)
			pair, err := id.Refresh(ctx, cloudSession.RefreshToken)
			if err != nil {
				t.Fatalf("offline Refresh: %v", err)
			}
			if pair.RefreshToken != cloudSession.RefreshToken || pair.OpenID != "o1" {
				t.Fatalf("offline pair %+v: want the same refresh token handed back", pair)
			}
			c, err := id.Verify(pair.AccessToken)
			if err != nil || c.OpenID != "o1" || c.Family != sess.Family {
				t.Fatalf("edge-signed access token: %+v, %v", c, err)
			}
		})
	}
	t.Run("offline: revoked session refused", func(t *testing.T) {
		id := e.identity(t, unreachable(t), nil, revoker{family: sess.Family})
		if _, err := id.Refresh(ctx, cloudSession.RefreshToken); !errors.Is(err, auth.ErrRefreshRevoked) {
			t.Fatalf("offline refresh of a revoked session: %v, want ErrRefreshRevoked", err)
		}
		if _, err := id.Verify(cloudSession.AccessToken); !errors.Is(err, auth.ErrInvalidToken) {
			t.Fatalf("access token of a revoked session: %v, want ErrInvalidToken", err)
		}
		if !id.Revoked(auth.Claims{Family: sess.Family}) {
			t.Fatal("Revoked does not consult the revocations")
		}
	})
	t.Run("offline: untrusted signer refused", func(t *testing.T) {
		seed := make([]byte, ed25519.SeedSize)
		seed[0] = 1
		ring, err := auth.NewMemoryKeyring(seed, nil)
		if err != nil {
			t.Fatal(err)
		}
		forged, _, err := auth.NewIssuer(ring, auth.IssuerConfig{Issuer: "cloud"}).Issue(ctx, "o1")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.identity(t, unreachable(t), nil, nil).Refresh(ctx, forged.RefreshToken); err == nil {
			t.Fatal("offline refresh accepted a token signed by an untrusted key")
		}
	})
	t.Run("local session stays local", func(t *testing.T) {
		fc := newFakeCloud(t)
		local, err := e.local.Issue(ctx, "o-dev")
		if err != nil {
			t.Fatal(err)
		}
		pair, err := e.identity(t, fc.srv.URL, nil, nil).Refresh(ctx, local.RefreshToken)
		if err != nil || pair.OpenID != "o-dev" || fc.calls.Load() != 0 {
			t.Fatalf("local refresh: %+v, %v, cloud calls %d", pair, err, fc.calls.Load())
		}
	})
}

// Through the edge's real API: with neither the cloud nor WeChat
// reachable, login answers 503 with a message saying so, and a session
// started earlier keeps working.
func TestAPILoginOffline(t *testing.T) {
	dir := t.TempDir()
	st, err := store.Open(filepath.Join(dir, "edge.db"), store.Options{EdgeID: "edge-1"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	keys, err := auth.OpenKeyring(filepath.Join(dir, "keys"), nil)
	if err != nil {
		t.Fatal(err)
	}
	local, err := auth.NewService(keys, st.DB(), auth.Config{Issuer: "edge-1", Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	engine, err := policy.New(context.Background(), policy.Config{Dir: filepath.Join("..", "..", "..", "policies"), Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	cl, err := client.New([]string{unreachable(t)}, "edge-token", client.WithRounds(1))
	if err != nil {
		t.Fatal(err)
	}
	id, err := federation.New(federation.Config{Local: local, Cloud: cl, Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := api.New(api.Config{EdgeID: "edge-1", Logger: quiet()},
		api.Deps{Store: st, Tokens: id, Login: id, Policy: engine})
	if err != nil {
		t.Fatal(err)
	}
	req := httptest.NewRequest(http.MethodPost, "/api/v1/auth/login", strings.NewReader(`{"code":"c1"}`))
	req.Header.Set("Content-Type", "application/json")
	resp, err := srv.App().Test(req, 10_000)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var env wire.Envelope[json.RawMessage]
	if err := json.NewDecoder(resp.Body).Decode(&env); err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(env.Message, "neither the cloud nor WeChat can be reached") {
		t.Fatalf("offline login: %d %q, want 503 saying neither the cloud nor WeChat can be reached", resp.StatusCode, env.Message)
	}
	if resp.Header.Get("Retry-After") == "" {
		t.Fatal("offline login without Retry-After")
	}

	// An existing session keeps working.
	pair, err := local.Issue(context.Background(), "o1")
	if err != nil {
		t.Fatal(err)
	}
	if c, err := id.Verify(pair.AccessToken); err != nil || c.OpenID != "o1" {
		t.Fatalf("existing session offline: %+v, %v", c, err)
	}
}
