package auth

import (
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"time"
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

// IssuerConfig configures an Issuer.
type IssuerConfig struct {
	Issuer     string
	AccessTTL  time.Duration // default DefaultAccessTTL
	RefreshTTL time.Duration // default DefaultRefreshTTL
	Leeway     time.Duration // default DefaultLeeway
	Now        func() time.Time
}

// Issuer issues access tokens and *signed* refresh tokens for a replicated
// cloud. Each refresh token carries its session (family, "fam") and its own
// id (jti); the Issuer keeps no state itself: the caller records each
// session's current token id in replicated state and commits every rotation
// as a compare-and-set on it, which is what detects reuse and makes sessions
// revocable. The signature still lets an edge check a refresh token offline
// when the cloud is unreachable.
type Issuer struct {
	cfg     IssuerConfig
	keys    *Keyring
	access  *verifier
	refresh *verifier
}

// Session is what the replicated state keeps of a refresh-token family: its
// newest token's id, issue time and expiry.
type Session struct {
	Family   string
	OpenID   string
	TokenID  string // jti of the newest refresh token
	IssuedAt time.Time
	Expires  time.Time
}

// NewIssuer builds an Issuer on keys.
func NewIssuer(keys *Keyring, cfg IssuerConfig) *Issuer {
	tokenDefaults(&cfg.AccessTTL, &cfg.RefreshTTL, &cfg.Leeway, &cfg.Now)
	return &Issuer{cfg: cfg, keys: keys,
		access:  newVerifier(keys, cfg.Leeway, cfg.Now),
		refresh: NewRefreshVerifier(keys, cfg.Leeway, cfg.Now).v}
}

// Issue starts a session for openid: a new family and its first pair. The
// caller records the Session before handing the pair out.
func (i *Issuer) Issue(ctx context.Context, openid string) (Pair, Session, error) {
	fam, err := randomToken(16)
	if err != nil {
		return Pair{}, Session{}, err
	}
	return i.issue(ctx, openid, fam)
}

func (i *Issuer) issue(ctx context.Context, openid, family string) (Pair, Session, error) {
	accessID, err := randomToken(16)
	if err != nil {
		return Pair{}, Session{}, err
	}
	refreshID, err := randomToken(16)
	if err != nil {
		return Pair{}, Session{}, err
	}
	return i.issueIDs(ctx, openid, family, accessID, refreshID, i.cfg.Now())
}

func (i *Issuer) issueIDs(ctx context.Context, openid, family, accessID, refreshID string, now time.Time) (Pair, Session, error) {
	if err := ctx.Err(); err != nil {
		return Pair{}, Session{}, err
	}
	if openid == "" {
		return Pair{}, Session{}, errors.New("auth: issue: empty openid")
	}
	access, _, err := signTokenID(i.keys, "", i.cfg.Issuer, openid, family, accessID, now, i.cfg.AccessTTL)
	if err != nil {
		return Pair{}, Session{}, err
	}
	refresh, rc, err := signTokenID(i.keys, refreshTyp, i.cfg.Issuer, openid, family, refreshID, now, i.cfg.RefreshTTL)
	if err != nil {
		return Pair{}, Session{}, err
	}
	return Pair{AccessToken: access, RefreshToken: refresh, ExpiresIn: int(i.cfg.AccessTTL / time.Second), OpenID: openid},
		Session{Family: family, OpenID: openid, TokenID: rc.ID, IssuedAt: rc.IssuedAt, Expires: rc.ExpiresAt}, nil
}

// successorIDs are the token ids of the pair that succeeds the refresh
// token with id presented: derived from it, not random, so that a retried
// refresh can be signed again identically (Reissue) and the replicated
// compare-and-set sees the same successor. An id is no secret (a token is
// only as good as its signature), and each is a hash of a chain that
// starts at a random login id.
func successorIDs(presented string) (accessID, refreshID string) {
	a := sha256.Sum256([]byte("outpost successor access id v1\x00" + presented))
	r := sha256.Sum256([]byte("outpost successor refresh id v1\x00" + presented))
	return base64.RawURLEncoding.EncodeToString(a[:16]), base64.RawURLEncoding.EncodeToString(r[:16])
}

// Refresh checks a signed refresh token and signs its successor in the same
// session. It does not decide whether the token may still be used: the
// caller commits the rotation (the family's current token id from
// presented.ID to next.TokenID) and hands the pair out only if that
// succeeded. Errors: ErrRefreshExpired, ErrRefreshNotFound (not a valid
// refresh token, or one without a session from before sessions were kept).
func (i *Issuer) Refresh(ctx context.Context, token string) (pair Pair, presented Claims, next Session, err error) {
	presented, err = i.refresh.verify(token)
	if err != nil {
		return Pair{}, Claims{}, Session{}, refreshErr(err)
	}
	if presented.Family == "" || presented.ID == "" {
		return Pair{}, Claims{}, Session{}, fmt.Errorf("%w: token has no session id (issued before sessions were tracked)", ErrRefreshNotFound)
	}
	accessID, refreshID := successorIDs(presented.ID)
	pair, next, err = i.issueIDs(ctx, presented.OpenID, presented.Family, accessID, refreshID, i.cfg.Now())
	return pair, presented, next, err
}

// Reissue signs again the pair Refresh signed for token at time at (the
// successor's IssuedAt): identical, as long as the signing key is the
// same. The cloud answers a refresh retried within the reuse grace with
// it. It checks the token as Refresh does, not whether it may be used.
func (i *Issuer) Reissue(ctx context.Context, token string, at time.Time) (Pair, Session, error) {
	presented, err := i.refresh.verify(token)
	if err != nil {
		return Pair{}, Session{}, refreshErr(err)
	}
	if presented.Family == "" || presented.ID == "" {
		return Pair{}, Session{}, fmt.Errorf("%w: token has no session id", ErrRefreshNotFound)
	}
	accessID, refreshID := successorIDs(presented.ID)
	return i.issueIDs(ctx, presented.OpenID, presented.Family, accessID, refreshID, at)
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

// AccessOnly signs a fresh access token for openid in session family with
// this service's own key, without starting a session: what an edge hands out
// when it accepted a cloud-signed refresh token offline and cannot reach the
// cloud to rotate it. It names the family so that a revocation the edge
// learns later refuses it too.
func (s *Service) AccessOnly(openid, family string) (string, int, error) {
	tok, _, err := signAccessFamily(s.keys, s.cfg.Issuer, openid, family, s.cfg.Now(), s.cfg.AccessTTL)
	return tok, int(s.cfg.AccessTTL / time.Second), err
}

// VerifyAt checks an access token as of at rather than now: the proof an
// edge forwards for a change a user made there, possibly long before the
// change reached the cloud. The signature must be by this issuer's keys;
// at must fall within the token's validity (with the leeway).
func (i *Issuer) VerifyAt(token string, at time.Time) (Claims, error) {
	return newVerifier(i.keys, i.cfg.Leeway, func() time.Time { return at }).verify(token)
}
