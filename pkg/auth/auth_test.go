package auth

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	bolt "go.etcd.io/bbolt"
)

// fakeClock is a manually advanced clock shared by a test's services.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *fakeClock { return &fakeClock{t: time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func openDB(t *testing.T, dir string) *bolt.DB {
	t.Helper()
	db, err := bolt.Open(filepath.Join(dir, "test.db"), 0o600, &bolt.Options{Timeout: time.Second})
	if err != nil {
		t.Fatalf("open bolt: %v", err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func openKeyring(t *testing.T, dir string, clk *fakeClock) *Keyring {
	t.Helper()
	k, err := OpenKeyring(dir, clk.Now)
	if err != nil {
		t.Fatalf("OpenKeyring: %v", err)
	}
	return k
}

type env struct {
	svc *Service
	clk *fakeClock
	dir string
	db  *bolt.DB
}

func newEnv(t *testing.T) *env {
	t.Helper()
	clk := newClock()
	dir := t.TempDir()
	db := openDB(t, dir)
	return &env{svc: newService(t, openKeyring(t, filepath.Join(dir, "keys"), clk), db, clk), clk: clk, dir: dir, db: db}
}

func newService(t *testing.T, k *Keyring, db *bolt.DB, clk *fakeClock) *Service {
	t.Helper()
	return newServiceCfg(t, k, db, Config{Issuer: "edge-test", Now: clk.Now})
}

func newServiceCfg(t *testing.T, k *Keyring, db *bolt.DB, cfg Config) *Service {
	t.Helper()
	s, err := NewService(k, db, cfg)
	if err != nil {
		t.Fatalf("NewService: %v", err)
	}
	return s
}

func issue(t *testing.T, s *Service, openid string) Pair {
	t.Helper()
	p, err := s.Issue(context.Background(), openid)
	if err != nil {
		t.Fatalf("Issue: %v", err)
	}
	return p
}

func TestIssueVerifyRoundTrip(t *testing.T) {
	e := newEnv(t)
	p := issue(t, e.svc, "o-alice")
	if p.OpenID != "o-alice" || p.ExpiresIn != 900 || p.AccessToken == "" || p.RefreshToken == "" {
		t.Fatalf("pair = %+v", p)
	}
	raw, err := base64.RawURLEncoding.DecodeString(p.RefreshToken)
	if err != nil || len(raw) < 32 {
		t.Fatalf("refresh token is not >=256-bit base64url: %q", p.RefreshToken)
	}
	c, err := e.svc.Verify(p.AccessToken)
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if c.OpenID != "o-alice" || c.Issuer != "edge-test" || c.ID == "" || c.KeyID != e.svc.Keys().SigningKID() {
		t.Fatalf("claims = %+v", c)
	}
	if !c.ExpiresAt.Equal(e.clk.Now().Add(15 * time.Minute)) {
		t.Fatalf("exp = %v", c.ExpiresAt)
	}
	b, _ := json.Marshal(p)
	for _, f := range []string{`"access_token"`, `"refresh_token"`, `"expires_in":900`, `"openid":"o-alice"`} {
		if !strings.Contains(string(b), f) {
			t.Errorf("login response %s lacks %s", b, f)
		}
	}
	if strings.Contains(p.String(), p.RefreshToken) {
		t.Errorf("Pair.String leaks the refresh token")
	}
}

// resign builds a token with the given method, key, kid and claims.
func resign(t *testing.T, m jwt.SigningMethod, key any, kid string, claims jwt.Claims) string {
	t.Helper()
	tok := jwt.NewWithClaims(m, claims)
	if kid != "" {
		tok.Header["kid"] = kid
	}
	s, err := tok.SignedString(key)
	if err != nil {
		t.Fatalf("sign: %v", err)
	}
	return s
}

func TestVerifyRejectsAttacks(t *testing.T) {
	e := newEnv(t)
	good := issue(t, e.svc, "o-alice").AccessToken
	kid, priv := e.svc.Keys().signer()
	pub := priv.Public().(ed25519.PublicKey)
	now := e.clk.Now()
	claims := func(sub string, iat, exp time.Time) jwt.RegisteredClaims {
		return jwt.RegisteredClaims{Subject: sub, Issuer: "edge-test", IssuedAt: jwt.NewNumericDate(iat), NotBefore: jwt.NewNumericDate(iat), ExpiresAt: jwt.NewNumericDate(exp)}
	}
	valid := claims("o-mallory", now, now.Add(time.Hour))
	_, otherPriv, _ := ed25519.GenerateKey(rand.Reader)
	parts := strings.Split(good, ".")
	forgedSig := parts[0] + "." + parts[1] + "." + flip(parts[2])
	payload, _ := base64.RawURLEncoding.DecodeString(parts[1])
	tamperedPayload := parts[0] + "." + base64.RawURLEncoding.EncodeToString([]byte(strings.Replace(string(payload), "o-alice", "o-admin", 1))) + "." + parts[2]

	tests := []struct {
		name  string
		token string
		want  error
	}{
		{"alg none", resign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, kid, valid), ErrInvalidToken},
		{"alg none stripped signature", strings.Join(parts[:2], ".") + ".", ErrInvalidToken},
		{"HS256 with public key as secret", resign(t, jwt.SigningMethodHS256, []byte(pub), kid, valid), ErrInvalidToken},
		{"HS256 with base64 public key", resign(t, jwt.SigningMethodHS256, []byte(base64.RawURLEncoding.EncodeToString(pub)), kid, valid), ErrInvalidToken},
		{"forged signature", forgedSig, ErrInvalidToken},
		{"tampered payload", tamperedPayload, ErrInvalidToken},
		{"re-signed with another key under our kid", resign(t, jwt.SigningMethodEdDSA, otherPriv, kid, valid), ErrInvalidToken},
		{"unknown kid", resign(t, jwt.SigningMethodEdDSA, otherPriv, "nope", valid), ErrUnknownKey},
		{"missing kid", resign(t, jwt.SigningMethodEdDSA, priv, "", valid), ErrInvalidToken},
		{"expired", resign(t, jwt.SigningMethodEdDSA, priv, kid, claims("o", now.Add(-2*time.Hour), now.Add(-time.Hour))), ErrTokenExpired},
		{"not yet valid", resign(t, jwt.SigningMethodEdDSA, priv, kid, claims("o", now.Add(time.Hour), now.Add(2*time.Hour))), ErrInvalidToken},
		{"no exp", resign(t, jwt.SigningMethodEdDSA, priv, kid, jwt.RegisteredClaims{Subject: "o", IssuedAt: jwt.NewNumericDate(now)}), ErrInvalidToken},
		{"no sub", resign(t, jwt.SigningMethodEdDSA, priv, kid, claims("", now, now.Add(time.Hour))), ErrInvalidToken},
		{"empty", "", ErrInvalidToken},
		{"garbage", "not a token", ErrInvalidToken},
		{"three garbage parts", "a.b.c", ErrInvalidToken},
		{"dots", "....", ErrInvalidToken},
		{"huge", strings.Repeat("A", 10000), ErrInvalidToken},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := e.svc.Verify(tt.token)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Verify err = %v, want %v (claims %+v)", err, tt.want, c)
			}
		})
	}
	// The control: the untampered token and a correctly re-signed one pass.
	if _, err := e.svc.Verify(good); err != nil {
		t.Fatalf("good token rejected: %v", err)
	}
	if _, err := e.svc.Verify(resign(t, jwt.SigningMethodEdDSA, priv, kid, valid)); err != nil {
		t.Fatalf("correctly signed token rejected: %v", err)
	}
}

func flip(s string) string {
	b := []byte(s)
	if b[5] == 'A' {
		b[5] = 'B'
	} else {
		b[5] = 'A'
	}
	return string(b)
}

func TestVerifyTimeBoundsWithLeeway(t *testing.T) {
	e := newEnv(t)
	p := issue(t, e.svc, "o")
	e.clk.Advance(15*time.Minute + 10*time.Second) // within leeway
	if _, err := e.svc.Verify(p.AccessToken); err != nil {
		t.Fatalf("within leeway: %v", err)
	}
	e.clk.Advance(time.Minute)
	if _, err := e.svc.Verify(p.AccessToken); !errors.Is(err, ErrTokenExpired) {
		t.Fatalf("after expiry: err = %v", err)
	}
}

func TestRotationKeepsOldTokensValid(t *testing.T) {
	e := newEnv(t)
	oldKid := e.svc.Keys().SigningKID()
	old := issue(t, e.svc, "o")
	newKid, err := e.svc.Rotate()
	if err != nil || newKid == oldKid {
		t.Fatalf("Rotate = %q, %v", newKid, err)
	}
	fresh := issue(t, e.svc, "o")
	for _, tok := range []string{old.AccessToken, fresh.AccessToken} {
		if _, err := e.svc.Verify(tok); err != nil {
			t.Fatalf("Verify after rotation: %v", err)
		}
	}
	if c, _ := e.svc.Verify(fresh.AccessToken); c.KeyID != newKid {
		t.Fatalf("new token kid = %q, want %q", c.KeyID, newKid)
	}
	// Refresh tokens are independent of signing keys: rotation logs nobody out.
	if _, err := e.svc.Refresh(context.Background(), old.RefreshToken); err != nil {
		t.Fatalf("refresh after rotation: %v", err)
	}
	// Retirement waits for the old key's tokens to expire.
	if err := e.svc.Maintain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, ok := e.svc.Keys().publicKey(oldKid); !ok {
		t.Fatal("old key retired while its tokens can still be live")
	}
	e.clk.Advance(DefaultAccessTTL + DefaultLeeway + time.Second)
	if err := e.svc.Maintain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, ok := e.svc.Keys().publicKey(oldKid); ok {
		t.Fatal("old key not retired after its tokens expired")
	}
	if _, ok := e.svc.Keys().publicKey(newKid); !ok {
		t.Fatal("signing key retired")
	}
}

func TestKeysSurviveRestart(t *testing.T) {
	clk := newClock()
	dir := t.TempDir()
	k1 := openKeyring(t, dir, clk)
	db := openDB(t, t.TempDir())
	s1 := newService(t, k1, db, clk)
	p := issue(t, s1, "o")
	if _, err := k1.Rotate(); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, KeyFileName))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode = %v, want 0600", fi.Mode().Perm())
	}
	leftovers, _ := filepath.Glob(filepath.Join(dir, ".*tmp*"))
	if len(leftovers) > 0 {
		t.Fatalf("temp files left behind: %v", leftovers)
	}

	k2 := openKeyring(t, dir, clk)
	if k2.SigningKID() != k1.SigningKID() {
		t.Fatalf("signing kid after reload = %q, want %q", k2.SigningKID(), k1.SigningKID())
	}
	s2 := newService(t, k2, db, clk)
	if _, err := s2.Verify(p.AccessToken); err != nil {
		t.Fatalf("token from before restart (pre-rotation key): %v", err)
	}
	if _, err := s1.Verify(issue(t, s2, "o").AccessToken); err != nil {
		t.Fatalf("token from reloaded keyring: %v", err)
	}
}

func TestOpenKeyringRejectsCorruptFile(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, KeyFileName), []byte("{not json"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenKeyring(dir, nil); err == nil {
		t.Fatal("corrupt key file accepted (it must not be silently replaced: that would log everyone out)")
	}
}

func TestTrustedKeysVerifyOffline(t *testing.T) {
	clk := newClock()
	cloud := newService(t, openKeyring(t, t.TempDir(), clk), openDB(t, t.TempDir()), clk)
	edgeDir := t.TempDir()
	edge := newService(t, openKeyring(t, edgeDir, clk), openDB(t, t.TempDir()), clk)
	p := issue(t, cloud, "o-phone")
	if _, err := edge.Verify(p.AccessToken); !errors.Is(err, ErrUnknownKey) {
		t.Fatalf("before sync: err = %v, want ErrUnknownKey", err)
	}

	// The set travels as JSON through sync.
	b, err := json.Marshal(cloud.Keys().PublicKeys())
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), `"d"`) || strings.Contains(string(b), "seed") {
		t.Fatalf("exported key set contains private material: %s", b)
	}
	var set JWKS
	if err := json.Unmarshal(b, &set); err != nil {
		t.Fatal(err)
	}
	if err := edge.Keys().SetTrusted(set); err != nil {
		t.Fatalf("SetTrusted: %v", err)
	}
	if _, err := edge.Verify(p.AccessToken); err != nil {
		t.Fatalf("after sync: %v", err)
	}
	// Trusted keys are for verification only and are not re-exported as ours.
	if n := len(edge.Keys().PublicKeys().Keys); n != 1 {
		t.Fatalf("edge exports %d own keys, want 1", n)
	}
	if n := len(edge.Keys().VerificationKeys().Keys); n != 2 {
		t.Fatalf("edge verifies with %d keys, want 2", n)
	}
	// They persist across a restart of the edge.
	reloaded := newService(t, openKeyring(t, edgeDir, clk), openDB(t, t.TempDir()), clk)
	if _, err := reloaded.Verify(p.AccessToken); err != nil {
		t.Fatalf("after edge restart: %v", err)
	}
	// Replacing the set drops keys no longer in it; local keys are untouched.
	if err := edge.Keys().SetTrusted(JWKS{}); err != nil {
		t.Fatal(err)
	}
	if _, err := edge.Verify(p.AccessToken); !errors.Is(err, ErrUnknownKey) {
		t.Fatalf("after removal: err = %v", err)
	}
	if _, err := edge.Verify(issue(t, edge, "o").AccessToken); err != nil {
		t.Fatalf("local token after trusted removal: %v", err)
	}
}

func TestSetTrustedValidates(t *testing.T) {
	clk := newClock()
	k := openKeyring(t, t.TempDir(), clk)
	pub, _, _ := ed25519.GenerateKey(rand.Reader)
	x := base64.RawURLEncoding.EncodeToString(pub)
	own := k.PublicKeys().Keys[0]
	tests := []struct {
		name string
		jwk  JWK
	}{
		{"rsa", JWK{Kty: "RSA", Crv: "Ed25519", X: x, Kid: "a"}},
		{"wrong curve", JWK{Kty: "OKP", Crv: "X25519", X: x, Kid: "a"}},
		{"short x", JWK{Kty: "OKP", Crv: "Ed25519", X: "AAAA", Kid: "a"}},
		{"no kid", JWK{Kty: "OKP", Crv: "Ed25519", X: x}},
		{"wrong alg", JWK{Kty: "OKP", Crv: "Ed25519", X: x, Kid: "a", Alg: "HS256"}},
		{"hijack local kid", JWK{Kty: "OKP", Crv: "Ed25519", X: x, Kid: own.Kid}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := k.SetTrusted(JWKS{Keys: []JWK{tt.jwk}}); err == nil {
				t.Fatal("accepted")
			}
		})
	}
	// An echo of our own key is harmless.
	if err := k.SetTrusted(JWKS{Keys: []JWK{own}}); err != nil {
		t.Fatalf("echo of own key: %v", err)
	}
}

func TestRefreshRotates(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	p1 := issue(t, e.svc, "o-alice")
	e.clk.Advance(time.Minute)
	p2, err := e.svc.Refresh(ctx, p1.RefreshToken)
	if err != nil {
		t.Fatalf("Refresh: %v", err)
	}
	if p2.RefreshToken == p1.RefreshToken || p2.AccessToken == p1.AccessToken || p2.OpenID != "o-alice" {
		t.Fatalf("refresh did not rotate: %+v", p2)
	}
	if c, err := e.svc.Verify(p2.AccessToken); err != nil || c.OpenID != "o-alice" {
		t.Fatalf("Verify refreshed: %+v %v", c, err)
	}
	p3, err := e.svc.Refresh(ctx, p2.RefreshToken)
	if err != nil {
		t.Fatalf("second Refresh: %v", err)
	}
	// The store holds hashes only: no token appears in the database.
	err = e.db.View(func(tx *bolt.Tx) error {
		return tx.ForEach(func(name []byte, b *bolt.Bucket) error {
			if !strings.HasPrefix(string(name), "auth_") {
				t.Errorf("bucket %q outside the auth_ prefix", name)
			}
			return b.ForEach(func(k, v []byte) error {
				for _, tok := range []string{p1.RefreshToken, p2.RefreshToken, p3.RefreshToken} {
					if strings.Contains(string(k)+string(v), tok) {
						t.Errorf("plaintext refresh token stored in %s", name)
					}
				}
				return nil
			})
		})
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestRefreshReuseRevokesFamily(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	p1 := issue(t, e.svc, "o")
	other := issue(t, e.svc, "o") // a second device of the same user
	p2, err := e.svc.Refresh(ctx, p1.RefreshToken)
	if err != nil {
		t.Fatal(err)
	}
	e.clk.Advance(DefaultRefreshReuseGrace + time.Second) // a retry within it is not a reuse
	if _, err := e.svc.Refresh(ctx, p1.RefreshToken); !errors.Is(err, ErrRefreshReused) {
		t.Fatalf("reuse: err = %v, want ErrRefreshReused", err)
	}
	if _, err := e.svc.Refresh(ctx, p2.RefreshToken); !errors.Is(err, ErrRefreshRevoked) {
		t.Fatalf("successor after reuse: err = %v, want ErrRefreshRevoked", err)
	}
	if _, err := e.svc.Refresh(ctx, other.RefreshToken); err != nil {
		t.Fatalf("other family affected by reuse: %v", err)
	}
}

func TestRefreshFailures(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	p := issue(t, e.svc, "o")
	e.clk.Advance(DefaultRefreshTTL + time.Second)
	if _, err := e.svc.Refresh(ctx, p.RefreshToken); !errors.Is(err, ErrRefreshExpired) {
		t.Fatalf("expired: err = %v", err)
	}
	for _, tok := range []string{"", "garbage", strings.Repeat("x", 43)} {
		if _, err := e.svc.Refresh(ctx, tok); !errors.Is(err, ErrRefreshNotFound) {
			t.Fatalf("unknown %q: err = %v", tok, err)
		}
	}
}

func TestRefreshSlidingExpiry(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	p := issue(t, e.svc, "o")
	for range 3 {
		e.clk.Advance(DefaultRefreshTTL - time.Hour)
		var err error
		if p, err = e.svc.Refresh(ctx, p.RefreshToken); err != nil {
			t.Fatalf("active user logged out: %v", err)
		}
	}
}

// TestConcurrentRefreshRotatesOnce: of concurrent refreshes with one token
// exactly one rotates it. With the reuse grace the others are retries and
// get that same pair; without it they are reuses.
func TestConcurrentRefreshRotatesOnce(t *testing.T) {
	for _, tc := range []struct {
		name  string
		grace time.Duration
	}{{"grace", 0}, {"no grace", -1}} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.svc = newServiceCfg(t, openKeyring(t, filepath.Join(e.dir, "keys"), e.clk), e.db,
				Config{Issuer: "edge-test", Now: e.clk.Now, RefreshReuseGrace: tc.grace})
			p := issue(t, e.svc, "o")
			const n = 16
			var wg sync.WaitGroup
			errs := make([]error, n)
			pairs := make([]Pair, n)
			start := make(chan struct{})
			for i := range n {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					pairs[i], errs[i] = e.svc.Refresh(context.Background(), p.RefreshToken)
				}()
			}
			close(start)
			wg.Wait()
			wins := map[Pair]int{}
			for i, err := range errs {
				switch {
				case err == nil:
					wins[pairs[i]]++
				case errors.Is(err, ErrRefreshReused), errors.Is(err, ErrRefreshRevoked):
				default:
					t.Fatalf("unexpected error: %v", err)
				}
			}
			want := map[bool]int{true: n, false: 1}[tc.grace >= 0]
			if len(wins) != 1 {
				t.Fatalf("%d distinct pairs handed out, want 1", len(wins))
			}
			for _, c := range wins {
				if c != want {
					t.Fatalf("%d of %d refreshes got the pair, want %d", c, n, want)
				}
			}
		})
	}
}

func TestRevoke(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	a1, a2, b := issue(t, e.svc, "o-a"), issue(t, e.svc, "o-a"), issue(t, e.svc, "o-a-suffix")
	n, err := e.svc.RevokeUser(ctx, "o-a")
	if err != nil || n != 2 {
		t.Fatalf("RevokeUser = %d, %v; want 2", n, err)
	}
	for _, p := range []Pair{a1, a2} {
		if _, err := e.svc.Refresh(ctx, p.RefreshToken); !errors.Is(err, ErrRefreshRevoked) {
			t.Fatalf("after RevokeUser: err = %v", err)
		}
	}
	// A user whose openid has the revoked one as a prefix is untouched.
	b2, err := e.svc.Refresh(ctx, b.RefreshToken)
	if err != nil {
		t.Fatalf("other user: %v", err)
	}
	if err := e.svc.Revoke(ctx, b2.RefreshToken); err != nil {
		t.Fatalf("Revoke: %v", err)
	}
	if _, err := e.svc.Refresh(ctx, b2.RefreshToken); !errors.Is(err, ErrRefreshRevoked) {
		t.Fatalf("after logout: err = %v", err)
	}
}

func TestMaintainPurgesExpired(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	old := issue(t, e.svc, "o-old")
	oldNext, err := e.svc.Refresh(ctx, old.RefreshToken)
	if err != nil {
		t.Fatal(err)
	}
	e.clk.Advance(DefaultRefreshTTL / 2)
	live := issue(t, e.svc, "o-live")
	e.clk.Advance(DefaultRefreshTTL/2 + time.Minute)
	if err := e.svc.Maintain(ctx); err != nil {
		t.Fatal(err)
	}
	count := func(bucket []byte) int {
		n := 0
		_ = e.db.View(func(tx *bolt.Tx) error { n = tx.Bucket(bucket).Stats().KeyN; return nil })
		return n
	}
	if got := count(bucketRefresh); got != 1 {
		t.Fatalf("%d refresh records after purge, want 1", got)
	}
	if got := count(bucketFamilies); got != 1 {
		t.Fatalf("%d families after purge, want 1", got)
	}
	if got := count(bucketUserFams); got != 1 {
		t.Fatalf("%d user index entries after purge, want 1", got)
	}
	if _, err := e.svc.Refresh(ctx, oldNext.RefreshToken); !errors.Is(err, ErrRefreshNotFound) {
		t.Fatalf("purged token: err = %v", err)
	}
	if _, err := e.svc.Refresh(ctx, live.RefreshToken); err != nil {
		t.Fatalf("live token after purge: %v", err)
	}
}

func TestRunStopsWithContext(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.svc.Run(ctx) }()
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not stop after cancel")
	}
}

func BenchmarkVerify(b *testing.B) {
	clk := newClock()
	k, err := OpenKeyring(b.TempDir(), clk.Now)
	if err != nil {
		b.Fatal(err)
	}
	tok, _, err := signAccess(k, "edge", "o", clk.Now(), time.Hour)
	if err != nil {
		b.Fatal(err)
	}
	v := newVerifier(k, time.Second, clk.Now)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := v.verify(tok); err != nil {
			b.Fatal(err)
		}
	}
}
