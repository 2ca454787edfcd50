package auth

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
)

// Defaults for Config.
const (
	DefaultAccessTTL  = 15 * time.Minute
	DefaultRefreshTTL = 30 * 24 * time.Hour
	DefaultLeeway     = 30 * time.Second
	// DefaultMaintenanceInterval is how often Run purges expired refresh
	// tokens and retires old signing keys.
	DefaultMaintenanceInterval = time.Hour
	// DefaultKeyRotation is how long a signing key signs before Maintain
	// rotates it.
	DefaultKeyRotation = 30 * 24 * time.Hour
	// DefaultRefreshReuseGrace is how long after a refresh a retry with
	// the same (now used) refresh token gets the same new pair instead of
	// revoking the session: long enough for a mini-program whose answer
	// was lost (sent to the background, a dropped link) to retry, short
	// enough that a copied token is still caught. The cloud uses it too.
	DefaultRefreshReuseGrace = 30 * time.Second
)

// refreshTokenBytes is the refresh token's entropy: 256 bits.
const refreshTokenBytes = 32

// purgeBatch bounds one purge transaction.
const purgeBatch = 1000

// Pair is a login or refresh result; its JSON form is the login response.
type Pair struct {
	AccessToken  string `json:"access_token"`
	RefreshToken string `json:"refresh_token"`
	ExpiresIn    int    `json:"expires_in"` // access token lifetime, seconds
	OpenID       string `json:"openid"`
}

// Config configures a Service. Zero values take the defaults.
type Config struct {
	Issuer     string        // iss of issued tokens, e.g. the edge or cloud id
	AccessTTL  time.Duration // default DefaultAccessTTL
	RefreshTTL time.Duration // default DefaultRefreshTTL; sliding, renewed on each refresh
	// Leeway tolerates clock skew between the signer and this verifier when
	// checking exp, nbf and iat. Default DefaultLeeway.
	Leeway time.Duration
	// RefreshReuseGrace: a refresh token presented again within this time
	// of its rotation, while its successor is unused, gets the same pair
	// again (a retry); any other reuse revokes the session. Default
	// DefaultRefreshReuseGrace; negative disables (every reuse revokes).
	RefreshReuseGrace   time.Duration
	MaintenanceInterval time.Duration // default DefaultMaintenanceInterval
	// KeyRotation is the age at which Maintain replaces the signing key.
	// The old key keeps verifying until its tokens expire, so rotation logs
	// nobody out. Default DefaultKeyRotation; negative disables.
	KeyRotation time.Duration
	Now         func() time.Time // default time.Now; injectable for tests
	Logger      *slog.Logger     // default slog.Default()
}

// tokenDefaults fills in the token settings Config and IssuerConfig share.
func tokenDefaults(accessTTL, refreshTTL, leeway *time.Duration, now *func() time.Time) {
	if *accessTTL <= 0 {
		*accessTTL = DefaultAccessTTL
	}
	if *refreshTTL <= 0 {
		*refreshTTL = DefaultRefreshTTL
	}
	if *leeway <= 0 {
		*leeway = DefaultLeeway
	}
	if *now == nil {
		*now = time.Now
	}
}

// Service issues, refreshes and verifies user credentials.
//
// Sessions: every access token names its session (the refresh-token
// family, claim "fam"), and Verify refuses the tokens of a revoked session
// at once — a reused refresh token, a logout, RevokeUser, RevokeSession —
// rather than letting them live out their AccessTTL. The revoked families
// are kept in memory (and in the database, so a restart keeps refusing
// them) for as long as a token of theirs could still verify.
type Service struct {
	cfg     Config
	keys    *Keyring
	refresh *refreshStore
	verify  *verifier
	log     *slog.Logger

	revMu   sync.RWMutex
	revoked map[string]time.Time // family -> until when its tokens are refused
}

// NewService builds a Service on keys, keeping refresh tokens in db (in
// buckets prefixed auth_, created if missing).
func NewService(keys *Keyring, db *bolt.DB, cfg Config) (*Service, error) {
	if keys == nil || db == nil {
		return nil, errors.New("auth: keyring and database are required")
	}
	tokenDefaults(&cfg.AccessTTL, &cfg.RefreshTTL, &cfg.Leeway, &cfg.Now)
	if cfg.MaintenanceInterval <= 0 {
		cfg.MaintenanceInterval = DefaultMaintenanceInterval
	}
	if cfg.KeyRotation == 0 {
		cfg.KeyRotation = DefaultKeyRotation
	}
	if cfg.RefreshReuseGrace == 0 {
		cfg.RefreshReuseGrace = DefaultRefreshReuseGrace
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	rs, err := newRefreshStore(db)
	if err != nil {
		return nil, err
	}
	revoked, err := rs.revokedFamilies(cfg.Now())
	if err != nil {
		return nil, err
	}
	return &Service{
		cfg:     cfg,
		keys:    keys,
		refresh: rs,
		verify:  newVerifier(keys, cfg.Leeway, cfg.Now),
		log:     cfg.Logger,
		revoked: revoked,
	}, nil
}

// refuseUntil is how long the access tokens of a session revoked now may
// still verify: the newest was issued no later than now.
func (s *Service) refuseUntil(now time.Time) time.Time {
	return now.Add(s.cfg.AccessTTL + s.cfg.Leeway)
}

// markRevoked records families as revoked in memory until until.
func (s *Service) markRevoked(until time.Time, families ...string) {
	s.revMu.Lock()
	defer s.revMu.Unlock()
	for _, f := range families {
		if f != "" && s.revoked[f].Before(until) {
			s.revoked[f] = until
		}
	}
}

// Revoked reports whether the session a verified token names was revoked
// here. It is cheap (a map lookup under a read lock): the edge's API asks
// it on every request, including those served from its verified-token
// cache.
func (s *Service) Revoked(c Claims) bool {
	if c.Family == "" {
		return false
	}
	s.revMu.RLock()
	until, ok := s.revoked[c.Family]
	s.revMu.RUnlock()
	return ok && s.cfg.Now().Before(until)
}

// RevokeSession ends session family — one of this service's or one issued
// elsewhere (a cloud session an edge learned was revoked) — refusing its
// access tokens until until.
func (s *Service) RevokeSession(family string, until time.Time) error {
	if family == "" {
		return nil
	}
	if err := s.refresh.revokeSession(family, until); err != nil {
		return err
	}
	s.markRevoked(until, family)
	return nil
}

// Keys is the service's keyring, for rotation, export and trusted-key sync.
func (s *Service) Keys() *Keyring { return s.keys }

// Issue starts a new session for openid (a fresh refresh-token family).
func (s *Service) Issue(ctx context.Context, openid string) (Pair, error) {
	if err := ctx.Err(); err != nil {
		return Pair{}, err
	}
	if openid == "" {
		return Pair{}, errors.New("auth: issue: empty openid")
	}
	now := s.cfg.Now()
	family, err := randomToken(16)
	if err != nil {
		return Pair{}, err
	}
	access, _, err := signAccessFamily(s.keys, s.cfg.Issuer, openid, family, now, s.cfg.AccessTTL)
	if err != nil {
		return Pair{}, err
	}
	refresh, err := randomToken(refreshTokenBytes)
	if err != nil {
		return Pair{}, err
	}
	if err := s.refresh.create(openid, refresh, family, now, now.Add(s.cfg.RefreshTTL)); err != nil {
		return Pair{}, err
	}
	return s.pair(access, refresh, openid), nil
}

// Refresh exchanges a refresh token for a new pair. The presented token is
// consumed; presenting it again revokes the session (ErrRefreshReused),
// except within RefreshReuseGrace of the rotation while its successor is
// unused: that retry gets the very same pair.
// Errors: ErrRefreshNotFound, ErrRefreshExpired, ErrRefreshRevoked,
// ErrRefreshReused, or a wrapped storage error.
func (s *Service) Refresh(ctx context.Context, refreshToken string) (Pair, error) {
	if err := ctx.Err(); err != nil {
		return Pair{}, err
	}
	if refreshToken == "" {
		return Pair{}, ErrRefreshNotFound
	}
	now := s.cfg.Now()
	issue := func(openid, family string) (Pair, error) {
		next, err := randomToken(refreshTokenBytes)
		if err != nil {
			return Pair{}, err
		}
		access, _, err := signAccessFamily(s.keys, s.cfg.Issuer, openid, family, now, s.cfg.AccessTTL)
		if err != nil {
			return Pair{}, err
		}
		return s.pair(access, next, openid), nil
	}
	pair, family, replayed, err := s.refresh.rotate(refreshToken, now, now.Add(s.cfg.RefreshTTL), s.refuseUntil(now), s.cfg.RefreshReuseGrace, issue)
	if err != nil {
		if errors.Is(err, ErrRefreshReused) {
			// Its access tokens are refused from this request on.
			s.markRevoked(s.refuseUntil(now), family)
			s.log.Warn("refresh token reused; session revoked")
		}
		return Pair{}, err
	}
	if replayed {
		s.log.Info("refresh retried within the reuse grace; the same pair is returned")
	}
	return pair, nil
}

func (s *Service) pair(access, refresh, openid string) Pair {
	return Pair{AccessToken: access, RefreshToken: refresh, ExpiresIn: int(s.cfg.AccessTTL / time.Second), OpenID: openid}
}

// Verify checks an access token offline against the keyring (own and
// trusted keys) and refuses one whose session was revoked here. Errors:
// ErrInvalidToken, ErrTokenExpired, ErrUnknownKey.
func (s *Service) Verify(accessToken string) (Claims, error) {
	c, err := s.verify.verify(accessToken)
	if err != nil {
		return c, err
	}
	if s.Revoked(c) {
		return Claims{}, fmt.Errorf("%w: the session was revoked", ErrInvalidToken)
	}
	return c, nil
}

// Revoke ends the session the refresh token belongs to (logout), its
// access tokens included.
func (s *Service) Revoke(ctx context.Context, refreshToken string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	until := s.refuseUntil(s.cfg.Now())
	family, err := s.refresh.revokeToken(refreshToken, until)
	s.markRevoked(until, family)
	return err
}

// RevokeUser ends every session of openid, access tokens included, and
// reports how many.
func (s *Service) RevokeUser(ctx context.Context, openid string) (int, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	until := s.refuseUntil(s.cfg.Now())
	families, err := s.refresh.revokeUser(openid, until)
	if err != nil {
		return 0, err
	}
	s.markRevoked(until, families...)
	return len(families), nil
}

// Rotate switches to a new signing key; tokens signed with the old one stay
// valid until they expire.
func (s *Service) Rotate() (string, error) { return s.keys.Rotate() }

// Maintain purges expired refresh tokens and retires signing keys that can
// no longer have live tokens. Run calls it periodically.
func (s *Service) Maintain(ctx context.Context) error {
	now := s.cfg.Now()
	total := 0
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		n, err := s.refresh.purge(now, purgeBatch)
		if err != nil {
			return err
		}
		total += n
		if n < purgeBatch {
			break
		}
	}
	revoked, err := s.refresh.revokedFamilies(now)
	if err != nil {
		return err
	}
	s.revMu.Lock()
	for f, until := range s.revoked {
		if !now.Before(until) {
			delete(s.revoked, f)
		}
	}
	for f, until := range revoked {
		if s.revoked[f].Before(until) {
			s.revoked[f] = until
		}
	}
	s.revMu.Unlock()
	var rotated string
	if s.cfg.KeyRotation > 0 {
		var err error
		if rotated, err = s.keys.RotateOlderThan(s.cfg.KeyRotation); err != nil {
			return err
		}
	}
	retired, err := s.keys.RetireKeys(s.cfg.AccessTTL + s.cfg.Leeway)
	if err != nil {
		return err
	}
	if total > 0 || len(retired) > 0 || rotated != "" {
		s.log.Info("auth maintenance", "purged_refresh_tokens", total, "retired_keys", retired, "new_signing_key", rotated)
	}
	return nil
}

// Run performs maintenance every MaintenanceInterval until ctx is done.
func (s *Service) Run(ctx context.Context) error {
	t := time.NewTicker(s.cfg.MaintenanceInterval)
	defer t.Stop()
	for {
		if err := s.Maintain(ctx); err != nil && ctx.Err() == nil {
			s.log.Error("auth maintenance failed", "err", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// String keeps accidental logging of a Pair from leaking its tokens.
func (p Pair) String() string {
	return fmt.Sprintf("auth.Pair{OpenID:%q ExpiresIn:%d}", p.OpenID, p.ExpiresIn)
}
