package auth

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// Errors Verify returns; all mean 401 to a client. ErrTokenExpired is worth
// telling apart because the client's remedy is to refresh, not to log in.
var (
	ErrInvalidToken = errors.New("auth: invalid access token")
	ErrTokenExpired = errors.New("auth: access token expired")
	ErrUnknownKey   = errors.New("auth: access token signed by an unknown key")
)

// Claims is what a verified access token asserts.
type Claims struct {
	OpenID    string    // sub
	Issuer    string    // iss
	ID        string    // jti
	Family    string    // fam: the session of a cloud-issued token ("" on a standalone edge's), checked against revocations
	KeyID     string    // kid header
	IssuedAt  time.Time // iat
	ExpiresAt time.Time // exp
}

// tokenClaims is the JWT claim set of both token types.
type tokenClaims struct {
	jwt.RegisteredClaims
	Family string `json:"fam,omitempty"`
}

// signAccess signs an access token for openid with the keyring's signing key.
func signAccess(k *Keyring, issuer, openid string, now time.Time, ttl time.Duration) (string, Claims, error) {
	return signAccessFamily(k, issuer, openid, "", now, ttl)
}

// signAccessFamily signs an access token that names its session, so that
// revoking the session can refuse it too.
func signAccessFamily(k *Keyring, issuer, openid, family string, now time.Time, ttl time.Duration) (string, Claims, error) {
	return signToken(k, "", issuer, openid, family, now, ttl)
}

// signToken signs a token for openid with the keyring's signing key: an
// access token when typ is "" (the JWT default typ), else one with that typ
// header (refreshTyp).
func signToken(k *Keyring, typ, issuer, openid, family string, now time.Time, ttl time.Duration) (string, Claims, error) {
	jti, err := randomToken(16)
	if err != nil {
		return "", Claims{}, err
	}
	return signTokenID(k, typ, issuer, openid, family, jti, now, ttl)
}

// signTokenID is signToken with a given token id. Ed25519 signatures are
// deterministic and the claims encode the same way every time, so the same
// inputs (and signing key) sign the same token: what lets the cloud hand a
// retried refresh the very pair it issued (Issuer.Reissue).
func signTokenID(k *Keyring, typ, issuer, openid, family, jti string, now time.Time, ttl time.Duration) (string, Claims, error) {
	kid, priv := k.signer()
	// JWT times have second resolution; truncate so Claims matches the token.
	now = now.Truncate(time.Second)
	c := Claims{OpenID: openid, Issuer: issuer, ID: jti, Family: family, KeyID: kid, IssuedAt: now, ExpiresAt: now.Add(ttl)}
	tok := jwt.NewWithClaims(jwt.SigningMethodEdDSA, tokenClaims{RegisteredClaims: jwt.RegisteredClaims{
		Subject:   openid,
		Issuer:    issuer,
		ID:        jti,
		IssuedAt:  jwt.NewNumericDate(c.IssuedAt),
		NotBefore: jwt.NewNumericDate(c.IssuedAt),
		ExpiresAt: jwt.NewNumericDate(c.ExpiresAt),
	}, Family: family})
	tok.Header["kid"] = kid
	what := "access"
	if typ != "" {
		tok.Header["typ"] = typ
		what = "refresh"
	}
	s, err := tok.SignedString(priv)
	if err != nil {
		return "", Claims{}, fmt.Errorf("auth: sign %s token: %w", what, err)
	}
	return s, c, nil
}

// verifier checks access tokens against a keyring. Only EdDSA is accepted:
// the parser rejects every other alg before the key function runs, and the
// key function re-checks, so "none" and HMAC-with-the-public-key confusion
// cannot reach signature verification.
type verifier struct {
	keys   *Keyring
	parser *jwt.Parser
	typ    string // JWT "typ" header expected: "" (access) or refreshTyp
}

func newVerifier(k *Keyring, leeway time.Duration, now func() time.Time) *verifier {
	return &verifier{
		keys: k,
		parser: jwt.NewParser(
			jwt.WithValidMethods([]string{jwt.SigningMethodEdDSA.Alg()}),
			jwt.WithLeeway(leeway),
			jwt.WithTimeFunc(now),
			jwt.WithIssuedAt(),
			jwt.WithExpirationRequired(),
			jwt.WithStrictDecoding(),
		),
	}
}

func (v *verifier) verify(token string) (Claims, error) {
	var tc tokenClaims
	rc := &tc.RegisteredClaims
	var kid string
	_, err := v.parser.ParseWithClaims(token, &tc, func(t *jwt.Token) (any, error) {
		if _, ok := t.Method.(*jwt.SigningMethodEd25519); !ok {
			return nil, fmt.Errorf("unexpected signing method %v", t.Header["alg"])
		}
		k, ok := t.Header["kid"].(string)
		if !ok || k == "" {
			return nil, errors.New("missing kid header")
		}
		if typ, _ := t.Header["typ"].(string); typ != v.typ && !(v.typ == "" && typ == "JWT") {
			// A refresh token is not an access token, and vice versa.
			return nil, fmt.Errorf("token type %q where %q was expected", typ, v.typ)
		}
		pk, ok := v.keys.publicKey(k)
		if !ok {
			return nil, fmt.Errorf("kid %q: %w", k, ErrUnknownKey)
		}
		kid = k
		return ed25519.PublicKey(pk), nil
	})
	switch {
	case err == nil:
	case errors.Is(err, ErrUnknownKey):
		return Claims{}, err
	case errors.Is(err, jwt.ErrTokenExpired):
		return Claims{}, fmt.Errorf("%w: %v", ErrTokenExpired, err)
	default:
		return Claims{}, fmt.Errorf("%w: %v", ErrInvalidToken, err)
	}
	if rc.Subject == "" {
		return Claims{}, fmt.Errorf("%w: no subject", ErrInvalidToken)
	}
	c := Claims{OpenID: rc.Subject, Issuer: rc.Issuer, ID: rc.ID, Family: tc.Family, KeyID: kid}
	if rc.IssuedAt != nil {
		c.IssuedAt = rc.IssuedAt.Time
	}
	if rc.ExpiresAt != nil {
		c.ExpiresAt = rc.ExpiresAt.Time
	}
	return c, nil
}

// randomToken returns n random bytes, base64url without padding.
func randomToken(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("auth: random: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}
