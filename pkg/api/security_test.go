package api

import (
	"bufio"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"

	"github.com/outpost-edge/outpost/pkg/auth"
)

// claimsFor are registered claims as the edge issues them.
func claimsFor(openid string, now time.Time) jwt.RegisteredClaims {
	return jwt.RegisteredClaims{
		Subject: openid, Issuer: "edge-1", ID: "jti-1",
		IssuedAt: jwt.NewNumericDate(now), NotBefore: jwt.NewNumericDate(now),
		ExpiresAt: jwt.NewNumericDate(now.Add(10 * time.Minute)),
	}
}

func sign(t *testing.T, m jwt.SigningMethod, key any, kid string, claims jwt.Claims) string {
	t.Helper()
	tok := jwt.NewWithClaims(m, claims)
	if kid != "" {
		tok.Header["kid"] = kid
	}
	s, err := tok.SignedString(key)
	if err != nil {
		t.Fatalf("sign %s: %v", m.Alg(), err)
	}
	return s
}

func TestForgedTokens(t *testing.T) {
	e := newEnv(t)
	e.seed("dev-a", 1)
	kid := e.tokens.Keys().SigningKID()
	var pub []byte
	for _, k := range e.tokens.Keys().PublicKeys().Keys {
		if k.Kid == kid {
			var err error
			if pub, err = base64.RawURLEncoding.DecodeString(k.X); err != nil {
				t.Fatal(err)
			}
		}
	}
	if len(pub) != ed25519.PublicKeySize {
		t.Fatalf("public key of %s not found", kid)
	}
	_, otherKey, _ := ed25519.GenerateKey(rand.Reader)
	now := time.Now()
	good := e.token("root")
	parts := strings.Split(good, ".")

	e.clock.shift(-time.Hour)
	expired := e.token("root")
	e.clock.shift(time.Hour)
	notYet := e.token("root")
	e.clock.reset()

	flip := []byte(parts[2])
	flip[5] ^= 1
	if flip[5] == '.' {
		flip[5] = 'A'
	}
	cases := []struct {
		name, token, msg string
	}{
		{"alg none", sign(t, jwt.SigningMethodNone, jwt.UnsafeAllowNoneSignatureType, kid, claimsFor("root", now)), "invalid access token"},
		{"alg none no signature part", parts[0][:0] + base64.RawURLEncoding.EncodeToString([]byte(`{"alg":"none","typ":"JWT"}`)) + "." + parts[1] + ".", "invalid access token"},
		{"forged signature", parts[0] + "." + parts[1] + "." + string(flip), "invalid access token"},
		{"signature stripped", parts[0] + "." + parts[1] + ".", "invalid access token"},
		{"claims swapped", parts[0] + "." + base64.RawURLEncoding.EncodeToString([]byte(`{"sub":"someone-else","exp":9999999999,"iat":1,"nbf":1}`)) + "." + parts[2], "invalid access token"},
		{"other key same kid", sign(t, jwt.SigningMethodEdDSA, otherKey, kid, claimsFor("root", now)), "invalid access token"},
		{"unknown kid", sign(t, jwt.SigningMethodEdDSA, otherKey, "not-a-kid", claimsFor("root", now)), "does not trust"},
		{"no kid", sign(t, jwt.SigningMethodEdDSA, otherKey, "", claimsFor("root", now)), "invalid access token"},
		{"HS256 with the public key", sign(t, jwt.SigningMethodHS256, pub, kid, claimsFor("root", now)), "invalid access token"},
		{"HS256 with the base64 public key", sign(t, jwt.SigningMethodHS256, []byte(base64.RawURLEncoding.EncodeToString(pub)), kid, claimsFor("root", now)), "invalid access token"},
		{"expired", expired, "access token expired"},
		{"not yet valid", notYet, "invalid access token"},
		{"garbage", "a.b.c", "invalid access token"},
		{"over-long", strings.Repeat("A", 3000), "invalid access token"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for _, p := range []string{"/api/v1/devices", "/api/v1/devices/dev-a", "/api/v1/edge"} {
				r := doOn(t, e, req{path: p, token: tc.token})
				if r.status != 401 || !strings.Contains(r.env.Message, tc.msg) {
					t.Fatalf("%s: %s; want 401 %q", p, r, tc.msg)
				}
				if !strings.Contains(r.header.Get("WWW-Authenticate"), "invalid_token") {
					t.Fatalf("WWW-Authenticate %q", r.header.Get("WWW-Authenticate"))
				}
			}
		})
	}
	// The control: the genuine token works.
	e.expect(req{path: "/api/v1/devices/dev-a", token: good}, 200)
}

// TestHostileIDs sends ids that try traversal, encoding tricks, control
// characters and excess length to every endpoint taking one: each is 400
// (or 404 when the router itself normalises the path away), never 2xx/5xx.
func TestHostileIDs(t *testing.T) {
	e := newEnv(t)
	e.seed("dev-a", 2)
	tok := e.token("root")
	ids := []string{
		"..", "%2e%2e", "%2E%2E", "..%2F..%2Fetc%2Fpasswd", "..%5C..%5Cwindows", "a%2Fb", "%2F",
		"a%00b", "a%01b", "a%0Ab", "a%0D%0Ab", "a%7Fb", "a%20b", "%C3%A9", "a%25b", "a%3Fb",
		strings.Repeat("d", 129), strings.Repeat("d", 4000),
	}
	templates := []struct{ method, path, body string }{
		{"GET", "/api/v1/devices/%s", ""},
		{"GET", "/api/v1/devices/%s/readings", ""},
		{"GET", "/api/v1/devices/%s/latest", ""},
		{"GET", "/api/v1/devices/%s/stats?metric=temp", ""},
		{"PUT", "/api/v1/devices/%s/desired", `{"state":{"a":1}}`},
		{"PUT", "/api/v1/devices/%s/meta", `{"region":"north"}`},
		{"PUT", "/api/v1/users/%s", `{"roles":["viewer"]}`},
	}
	before, err := e.store.Device("dev-a")
	if err != nil {
		t.Fatal(err)
	}
	for _, tp := range templates {
		for _, id := range ids {
			rq := req{method: tp.method, path: fmt.Sprintf(tp.path, id), token: tok}
			if tp.body != "" {
				rq.body = tp.body
			}
			r := doOn(t, e, rq)
			// An id past the header buffer is refused by the server itself.
			if r.status != 400 && !(r.status == 431 && len(id) > 1000) {
				t.Errorf("%s %s: %s, want 400", tp.method, truncate(rq.path), r)
			}
		}
	}
	// Paths the router normalises: never a device answer, never a 5xx.
	for _, p := range []string{"/api/v1/devices/../../etc/passwd", "/api/v1/devices/dev-a/../../../metrics", "/api/v1/devices/./dev-a/../x"} {
		r := rawGet(t, e, p, tok)
		if r.status != 400 && r.status != 404 && r.status != 401 {
			t.Errorf("GET %s: %s", p, r)
		}
	}
	after, _ := e.store.Device("dev-a")
	if len(after.Desired.State()) != len(before.Desired.State()) || after.Meta.Region != before.Meta.Region {
		t.Fatal("a hostile request changed dev-a")
	}
}

// rawGet writes a request line verbatim, so that no client cleans the path.
func rawGet(t *testing.T, e *testEnv, path, tok string) *response {
	t.Helper()
	return rawDo(t, e, "GET "+path+" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "+tok+"\r\nConnection: close\r\n\r\n")
}

// rawDo writes raw as the whole request and reads one response.
func rawDo(t *testing.T, e *testEnv, raw string) *response {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(e.base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, raw); err != nil {
		t.Fatal(err)
	}
	hr, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("%s: %v", truncate(raw), err)
	}
	defer hr.Body.Close()
	r := &response{status: hr.StatusCode, header: hr.Header}
	if r.body, err = io.ReadAll(hr.Body); err != nil {
		t.Fatal(err)
	}
	checkEnvelope(t, req{method: "RAW", path: raw}, r)
	return r
}

func TestHostileBodies(t *testing.T) {
	e := newEnv(t)
	e.seed("dev-a", 1)
	tok := e.token("root")
	cases := []struct {
		name, path, body string
		status           int
		msg              string
	}{
		{"trailing garbage", "/api/v1/devices/dev-a/desired", `{"state":{"a":1}}garbage`, 400, "trailing data"},
		{"trailing object", "/api/v1/devices/dev-a/desired", `{"state":{"a":1}} {"state":{"b":2}}`, 400, "trailing data"},
		{"trailing bracket", "/api/v1/devices/dev-a/desired", `{"state":{"a":1}}]`, 400, "trailing data"},
		{"top-level array", "/api/v1/devices/dev-a/desired", `[{"state":{"a":1}}]`, 400, "JSON object"},
		{"top-level string", "/api/v1/devices/dev-a/desired", `"state"`, 400, "JSON object"},
		{"top-level null", "/api/v1/devices/dev-a/desired", `null`, 400, "at least one field"},
		{"deep nesting", "/api/v1/devices/dev-a/desired", `{"state":{"a":` + strings.Repeat("[", 3000) + strings.Repeat("]", 3000) + `}}`, 400, "nested deeper than 32 levels"},
		{"invalid UTF-8", "/api/v1/devices/dev-a/desired", "{\"state\":{\"a\":\"\xff\xfe\"}}", 400, "invalid UTF-8"},
		{"duplicate keys", "/api/v1/devices/dev-a/desired", `{"state":{"a":1},"state":{"b":2}}`, 200, ""},
		{"huge number", "/api/v1/devices/dev-a/desired", `{"state":{"a":1e999999}}`, 400, "not a finite float64"},
		{"truncated", "/api/v1/users/bob", `{"roles":["vi`, 400, "not valid JSON"},
		{"whitespace only", "/api/v1/users/bob", "  \n\t ", 400, "empty"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := doOn(t, e, req{method: "PUT", path: tc.path, token: tok, body: tc.body})
			if r.status != tc.status || !strings.Contains(r.env.Message, tc.msg) {
				t.Fatalf("%s; want %d containing %q", r, tc.status, tc.msg)
			}
		})
	}
	t.Run("huge header", func(t *testing.T) {
		r := e.do(req{path: "/api/v1/edge", token: tok, header: map[string]string{"X-Junk": strings.Repeat("j", 16<<10)}})
		if r.status != 431 && r.status != 400 {
			t.Fatalf("%s", r)
		}
	})
	t.Run("huge bodies", func(t *testing.T) {
		// The declared length alone is refused: the server answers before
		// reading (and buffering) the body.
		for _, size := range []int{8<<10 + 1, 1 << 20, 1 << 40} {
			r := rawDo(t, e, fmt.Sprintf("POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n{\"code\":\"%s", loginPath, size, strings.Repeat("x", 1000)))
			if r.status != 413 {
				t.Fatalf("Content-Length %d: %s", size, r)
			}
		}
		e.expect(req{path: "/healthz"}, 200)
	})
}

// TestVerifiedTokenCache: a cached verification never outlives the token,
// and a token whose key stops being trusted stops working within the
// cache's ttl.
func TestVerifiedTokenCache(t *testing.T) {
	e := newEnv(t)
	e.seed("dev-a", 1)
	tok := e.token("root")
	e.expect(req{path: "/api/v1/devices/dev-a", token: tok}, 200)
	e.expect(req{path: "/api/v1/devices/dev-a", token: tok}, 200) // from the cache
	e.clock.set(t, 16*time.Minute)
	r := e.expect(req{path: "/api/v1/devices/dev-a", token: tok}, 401)
	if !strings.Contains(r.env.Message, "expired") {
		t.Fatalf("message %q", r.env.Message)
	}
	e.clock.reset()

	// A key trusted from elsewhere (the cloud's), then withdrawn.
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	kid := "cloud-key-1"
	set := auth.JWKS{Keys: []auth.JWK{{Kty: "OKP", Crv: "Ed25519", X: base64.RawURLEncoding.EncodeToString(pub), Kid: kid, Alg: "EdDSA", Use: "sig"}}}
	if err := e.tokens.Keys().SetTrusted(set); err != nil {
		t.Fatal(err)
	}
	cloudTok := sign(t, jwt.SigningMethodEdDSA, priv, kid, claimsFor("root", time.Now()))
	e.expect(req{path: "/api/v1/devices/dev-a", token: cloudTok}, 200)
	if err := e.tokens.Keys().SetTrusted(auth.JWKS{}); err != nil {
		t.Fatal(err)
	}
	e.clock.set(t, 31*time.Second)
	e.expect(req{path: "/api/v1/devices/dev-a", token: cloudTok}, 401)
	// Uncached, the withdrawal applies at once.
	other := sign(t, jwt.SigningMethodEdDSA, priv, kid, claimsFor("other", time.Now()))
	e.expect(req{path: "/api/v1/edge", token: other}, 401)
}

// TestSyncedRoleChange: roles written to the store other than through the
// API (as sync does) apply within the user cache's ttl.
func TestSyncedRoleChange(t *testing.T) {
	e := newEnv(t)
	e.seed("dev-a", 1)
	tok := e.token("synced")
	e.expect(req{path: "/api/v1/devices/dev-a", token: tok}, 403)
	e.putUser("synced", []string{"operator"}, []string{"north"})
	e.clock.set(t, 2*time.Second)
	e.expect(req{path: "/api/v1/devices/dev-a", token: tok}, 200)
	e.clock.reset()
	// Revocation too.
	e.putUser("synced", nil, nil)
	e.clock.set(t, 4*time.Second)
	e.expect(req{path: "/api/v1/devices/dev-a", token: tok}, 403)
}
