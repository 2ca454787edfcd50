package api

import (
	"net/http"
	"strings"
	"testing"

	"github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// JSON the daemons accept and serve back: a desired value nested 5000
// levels deep, 1e400 or invalid UTF-8 was stored through the edge's API and
// then served in the device list, where clients crashed parsing it. Such a
// body is now a 400, and the device list serves only JSON that follows the
// shared rules.
func TestSecurityJSONBodyRefused(t *testing.T) {
	e := newEnv(t, withConfig(func(c *Config) { c.BodyLimit = wire.MaxRequestBytes }))
	root := e.token("root")
	nest := func(n int) string { return strings.Repeat("[", n) + strings.Repeat("]", n) }
	e.expect(req{method: http.MethodPut, path: "/api/v1/devices/d1/desired", token: root, body: `{"state":{"mode":"eco"}}`}, 200)
	for _, tc := range []struct{ name, body, want string }{
		{"5000 levels", `{"state":{"deep":` + nest(5000) + `}}`, "nested deeper than 32 levels"},
		{"33 levels", `{"state":{"deep":` + nest(31) + `}}`, "nested deeper than 32 levels"},
		{"1e400", `{"state":{"big":1e400}}`, "not a finite float64"},
		{"nested -1e400", `{"state":{"big":{"v":[-1e400]}}}`, "not a finite float64"},
		{"invalid UTF-8 value", "{\"state\":{\"name\":\"\xff\xfe\"}}", "invalid UTF-8"},
		{"invalid UTF-8 key", "{\"state\":{\"\xc3\x28\":1}}", "invalid UTF-8"},
		{"unpaired surrogate", `{"state":{"name":"\ud800"}}`, "unpaired surrogate"},
	} {
		r := e.expect(req{method: http.MethodPut, path: "/api/v1/devices/d1/desired", token: root, body: tc.body}, 400)
		if !strings.Contains(r.env.Message, tc.want) {
			t.Errorf("%s: message %q, want %q", tc.name, r.env.Message, tc.want)
		}
	}
	// The other bodies go through the same decoding.
	e.expect(req{method: http.MethodPut, path: "/api/v1/devices/d1/meta", token: root, body: "{\"region\":\"north\",\"tags\":{\"k\":\"\xff\"}}"}, 400)
	e.expect(req{method: http.MethodPut, path: "/api/v1/users/bob", token: root, body: `{"roles":["viewer"],"regions":` + nest(40) + `}`}, 400)
	e.expect(req{method: http.MethodPost, path: "/api/v1/auth/login", body: "{\"code\":\"dev:\xff\"}"}, 400)

	r := e.expect(req{path: "/api/v1/devices", token: root}, 200)
	if err := wire.CheckJSON(r.body, wire.MaxSyncJSONDepth); err != nil {
		t.Fatalf("the device list breaks the JSON rules: %v", err)
	}
	var page devicePage
	r.data(t, &page)
	if len(page.Items) != 1 || len(page.Items[0].Desired) != 1 || string(page.Items[0].Desired["mode"]) != `"eco"` {
		t.Fatalf("device list %s, want d1 with only mode", r.env.Data)
	}
}

// Device-id oracle: 404 vs 403 told a role-less user whether a device id
// exists. Every device route now answers a caller who may not read the
// device the same 403, with the policy's reason, whether it exists or not;
// 404 is for callers who could read it.
func TestSecurityDeviceIDOracle(t *testing.T) {
	e := newEnv(t)
	e.seed("known", 3)
	e.setMeta("known", "north", "carol")
	e.putUser("vic", []string{"viewer"}, nil)
	routes := []string{"", "/readings", "/latest", "/stats?metric=temp"}
	for _, who := range []string{"nobody", "vic"} {
		tok := e.token(who)
		for _, route := range routes {
			known := e.do(req{path: "/api/v1/devices/known" + route, token: tok})
			ghost := e.do(req{path: "/api/v1/devices/ghost" + route, token: tok})
			if known.status != 403 || ghost.status != known.status ||
				strings.ReplaceAll(ghost.env.Message, "ghost", "known") != known.env.Message {
				t.Errorf("%s GET %s: existing device %d %q, missing device %d %q; want the same 403",
					who, route, known.status, known.env.Message, ghost.status, ghost.env.Message)
			}
		}
	}
	// Those who may read any device still learn that one does not exist.
	root := e.token("root")
	for _, route := range routes {
		e.expect(req{path: "/api/v1/devices/ghost" + route, token: root}, 404)
	}
}

// Sessions: access tokens survived refresh-reuse revocation for up to 15
// minutes (the access TTL). At the edge, a reused refresh token now ends
// the session's access tokens on the next request, also those the API
// already holds in its verified-token cache.
func TestSecurityAccessTokenRefusedAfterRefreshReuse(t *testing.T) {
	e := newEnv(t)
	p0 := e.login("alice")
	e.expect(req{path: "/api/v1/edge", token: p0.AccessToken}, 200) // now in the verified-token cache
	r := e.expect(req{method: http.MethodPost, path: "/api/v1/auth/refresh", body: map[string]string{"refresh_token": p0.RefreshToken}}, 200)
	var p1 struct {
		AccessToken  string `json:"access_token"`
		RefreshToken string `json:"refresh_token"`
	}
	r.data(t, &p1)
	e.expect(req{path: "/api/v1/edge", token: p1.AccessToken}, 200)
	var p2 struct {
		AccessToken string `json:"access_token"`
	}
	r = e.expect(req{method: http.MethodPost, path: "/api/v1/auth/refresh", body: map[string]string{"refresh_token": p1.RefreshToken}}, 200)
	r.data(t, &p2)
	e.expect(req{path: "/api/v1/edge", token: p2.AccessToken}, 200)
	other := e.login("alice") // another session of the same user
	// The copied first refresh token is presented again (not a retry of
	// the last refresh, so the reuse grace does not apply): the session
	// is revoked, and so are its access tokens, at once.
	r = e.expect(req{method: http.MethodPost, path: "/api/v1/auth/refresh", body: map[string]string{"refresh_token": p0.RefreshToken}}, 401)
	if r.env.Message != wire.MsgRefreshReused {
		t.Fatalf("reuse: %q", r.env.Message)
	}
	for name, tok := range map[string]string{"first": p0.AccessToken, "rotated": p1.AccessToken, "newest": p2.AccessToken} {
		if r := e.do(req{path: "/api/v1/edge", token: tok}); r.status != 401 {
			t.Errorf("%s access token of the revoked session: %d, want 401", name, r.status)
		}
	}
	e.expect(req{path: "/api/v1/edge", token: other.AccessToken}, 200)
}

// A standalone edge's token service refuses revoked sessions from the
// verified-token cache too.
var _ RevocationChecker = (*auth.Service)(nil)
