package auth

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// refreshTyp is the JWT "typ" header of signed refresh tokens, so that one
// can never pass as an access token (whose typ is "JWT").
const refreshTyp = "refresh+jwt"

// NewMemoryKeyring returns a keyring that signs with the Ed25519 key derived
// from seed and persists nothing: the cloud's deployment key, which lives in
// the replicated state rather than in a key file.
func NewMemoryKeyring(seed []byte, now func() time.Time) (*Keyring, error) {
	if len(seed) != ed25519.SeedSize {
		return nil, fmt.Errorf("keyring: seed must be %d bytes", ed25519.SeedSize)
	}
	if now == nil {
		now = time.Now
	}
	priv := ed25519.NewKeyFromSeed(seed)
	pub := priv.Public().(ed25519.PublicKey)
	sk := storedKey{KID: Thumbprint(pub), Public: pub, Seed: append([]byte(nil), seed...), Created: now().UTC()}
	k := &Keyring{now: now}
	if err := k.commit(keyFile{Version: keyFileVersion, SigningKID: sk.KID, Keys: []storedKey{sk}}); err != nil {
		return nil, err
	}
	return k, nil
}

// IssuerConfig configures a stateless Issuer.
type IssuerConfig struct {
	Issuer     string
	AccessTTL  time.Duration // default DefaultAccessTTL
	RefreshTTL time.Duration // default DefaultRefreshTTL
	Leeway     time.Duration // default DefaultLeeway
	Now        func() time.Time
}

// Issuer issues access tokens and *signed* refresh tokens. Unlike Service it
// keeps no session state, so every node of a replicated cloud (and, offline,
// every edge that trusts the key) can check a refresh token it did not
// issue. Each refresh returns a new refresh token (rotation); the old one
// stays valid until it expires, because without shared state reuse cannot
// be detected — the price of working on any node.
type Issuer struct {
	cfg     IssuerConfig
	keys    *Keyring
	access  *verifier
	refresh *verifier
}

// NewIssuer builds an Issuer on keys.
func NewIssuer(keys *Keyring, cfg IssuerConfig) *Issuer {
	if cfg.AccessTTL <= 0 {
		cfg.AccessTTL = DefaultAccessTTL
	}
	if cfg.RefreshTTL <= 0 {
		cfg.RefreshTTL = DefaultRefreshTTL
	}
	if cfg.Leeway <= 0 {
		cfg.Leeway = DefaultLeeway
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Issuer{cfg: cfg, keys: keys,
		access:  newVerifier(keys, cfg.Leeway, cfg.Now),
		refresh: NewRefreshVerifier(keys, cfg.Leeway, cfg.Now).v}
}

// Issue starts a session for openid.
func (i *Issuer) Issue(ctx context.Context, openid string) (Pair, error) {
	if err := ctx.Err(); err != nil {
		return Pair{}, err
	}
	if openid == "" {
		return Pair{}, errors.New("auth: issue: empty openid")
	}
	now := i.cfg.Now()
	access, _, err := signAccess(i.keys, i.cfg.Issuer, openid, now, i.cfg.AccessTTL)
	if err != nil {
		return Pair{}, err
	}
	refresh, err := signRefresh(i.keys, i.cfg.Issuer, openid, now, i.cfg.RefreshTTL)
	if err != nil {
		return Pair{}, err
	}
	return Pair{AccessToken: access, RefreshToken: refresh, ExpiresIn: int(i.cfg.AccessTTL / time.Second), OpenID: openid}, nil
}

// Refresh checks a signed refresh token and issues a new pair. Errors:
// ErrRefreshExpired, ErrRefreshNotFound (not a valid refresh token).
func (i *Issuer) Refresh(ctx context.Context, token string) (Pair, error) {
	c, err := i.refresh.verify(token)
	if err != nil {
		return Pair{}, refreshErr(err)
	}
	return i.Issue(ctx, c.OpenID)
}

// Verify checks an access token.
func (i *Issuer) Verify(token string) (Claims, error) { return i.access.verify(token) }

// Keys is the issuer's keyring.
func (i *Issuer) Keys() *Keyring { return i.keys }

// RefreshVerifier checks signed refresh tokens offline against a keyring's
// keys (own and trusted): what an edge uses to keep a cloud session alive
// while the cloud is unreachable.
type RefreshVerifier struct{ v *verifier }

// NewRefreshVerifier returns a verifier of signed refresh tokens.
func NewRefreshVerifier(keys *Keyring, leeway time.Duration, now func() time.Time) *RefreshVerifier {
	if now == nil {
		now = time.Now
	}
	v := newVerifier(keys, leeway, now)
	v.typ = refreshTyp
	return &RefreshVerifier{v: v}
}

// Verify returns the refresh token's claims. Errors: ErrRefreshExpired,
// ErrRefreshNotFound.
func (r *RefreshVerifier) Verify(token string) (Claims, error) {
	c, err := r.v.verify(token)
	if err != nil {
		return Claims{}, refreshErr(err)
	}
	return c, nil
}

// IsSignedRefresh reports whether token has the shape of a signed refresh
// token (a JWT) rather than an opaque local one.
func IsSignedRefresh(token string) bool {
	dots := 0
	for i := 0; i < len(token); i++ {
		if token[i] == '.' {
			dots++
		}
	}
	return dots == 2
}

func refreshErr(err error) error {
	if errors.Is(err, ErrTokenExpired) {
		return fmt.Errorf("%w: %v", ErrRefreshExpired, err)
	}
	return fmt.Errorf("%w: %v", ErrRefreshNotFound, err)
}

func signRefresh(k *Keyring, issuer, openid string, now time.Time, ttl time.Duration) (string, error) {
	kid, priv := k.signer()
	jti, err := randomToken(16)
	if err != nil {
		return "", err
	}
	now = now.Truncate(time.Second)
	tok := jwt.NewWithClaims(jwt.SigningMethodEdDSA, jwt.RegisteredClaims{
		Subject: openid, Issuer: issuer, ID: jti,
		IssuedAt: jwt.NewNumericDate(now), NotBefore: jwt.NewNumericDate(now), ExpiresAt: jwt.NewNumericDate(now.Add(ttl)),
	})
	tok.Header["kid"] = kid
	tok.Header["typ"] = refreshTyp
	s, err := tok.SignedString(priv)
	if err != nil {
		return "", fmt.Errorf("auth: sign refresh token: %w", err)
	}
	return s, nil
}

// AccessOnly signs a fresh access token for openid with this service's own
// key, without starting a session: what an edge hands out when it accepted a
// cloud-signed refresh token offline and cannot reach the cloud to rotate it.
func (s *Service) AccessOnly(openid string) (string, int, error) {
	tok, _, err := signAccess(s.keys, s.cfg.Issuer, openid, s.cfg.Now(), s.cfg.AccessTTL)
	return tok, int(s.cfg.AccessTTL / time.Second), err
}
