package api

import (
	"encoding/json"
	"fmt"
	"io"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/wire"
)

const (
	loginPath   = "/api/v1/auth/login"
	refreshPath = "/api/v1/auth/refresh"
)

func TestLogin(t *testing.T) {
	e := newEnv(t)
	long := strings.Repeat("a", 129)
	cases := []struct {
		name   string
		body   any
		status int
		msg    string
	}{
		{"dev login", `{"code":"dev:alice"}`, 200, ""},
		{"dev login invalid openid slash", `{"code":"dev:../etc"}`, 400, "dev login openid"},
		{"dev login invalid openid percent", `{"code":"dev:%2e%2e"}`, 400, "dev login openid"},
		{"dev login invalid openid control", `{"code":"dev:a\u0001b"}`, 400, "dev login openid"},
		{"dev login invalid openid space", `{"code":"dev:a b"}`, 400, "dev login openid"},
		{"dev login empty openid", `{"code":"dev:"}`, 400, "dev login openid"},
		{"dev login over-long openid", `{"code":"dev:` + long + `"}`, 400, "dev login openid"},
		{"missing code", `{}`, 400, `"code" is required`},
		{"empty code", `{"code":""}`, 400, `"code" is required`},
		{"over-long code", `{"code":"` + strings.Repeat("x", 600) + `"}`, 400, `"code" is too long`},
		{"empty body", ``, 400, "empty"},
		{"malformed JSON", `{"code":`, 400, "not valid JSON"},
		{"not an object", `["dev:a"]`, 400, ""},
		{"wrong type", `{"code":42}`, 400, `"code" must be a string`},
		{"unknown field", `{"code":"dev:a","coode":"x"}`, 400, `unknown field "coode"`},
		{"trailing garbage", `{"code":"dev:a"} trailing`, 400, "trailing data"},
		{"two objects", `{"code":"dev:a"}{"code":"dev:b"}`, 400, "trailing data"},
		{"non-dev code without WeChat", `{"code":"abc"}`, 503, "login unavailable"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := doOn(t, e, req{method: "POST", path: loginPath, body: tc.body})
			if r.status != tc.status || !strings.Contains(r.env.Message, tc.msg) {
				t.Fatalf("status %d message %q; want %d containing %q", r.status, r.env.Message, tc.status, tc.msg)
			}
			if tc.status == 200 {
				var p struct {
					AccessToken  string `json:"access_token"`
					RefreshToken string `json:"refresh_token"`
					ExpiresIn    int    `json:"expires_in"`
					OpenID       string `json:"openid"`
				}
				r.data(t, &p)
				if p.OpenID != "alice" || p.AccessToken == "" || p.RefreshToken == "" || p.ExpiresIn != 900 {
					t.Fatalf("pair %s", r.env.Data)
				}
				c, err := e.tokens.Verify(p.AccessToken)
				if err != nil || c.OpenID != "alice" {
					t.Fatalf("issued token does not verify: %v %+v", err, c)
				}
			}
		})
	}
}

func TestDevLoginDisabled(t *testing.T) {
	e := newEnv(t, withConfig(func(c *Config) { c.DevLogin = false }))
	r := e.expect(req{method: "POST", path: loginPath, body: `{"code":"dev:alice"}`}, 400)
	if !strings.Contains(r.env.Message, "dev login is disabled") {
		t.Fatalf("message %q", r.env.Message)
	}
}

func TestWeChatLogin(t *testing.T) {
	fw := newFakeWeChat(t)
	e := newEnv(t, withWeChat(t, fw))
	cases := []struct {
		code       string
		status     int
		msg        string
		retryAfter bool
	}{
		{"ok-wx-openid-1", 200, "ok", false},
		{"invalid", 400, "invalid or expired login code", false},
		{"ratelimited", 429, "rate limiting", true},
		{"blocked", 403, "blocked", false},
		{"busy", 503, "busy", true},
		{"down", 503, "neither the cloud nor WeChat can be reached", true},
		{"slow", 503, "neither the cloud nor WeChat can be reached", true},
		{"weird", 502, "login failed upstream", false},
	}
	for _, tc := range cases {
		t.Run(tc.code, func(t *testing.T) {
			r := doOn(t, e, req{method: "POST", path: loginPath, body: map[string]string{"code": tc.code}})
			if r.status != tc.status || !strings.Contains(r.env.Message, tc.msg) {
				t.Fatalf("status %d message %q; want %d containing %q", r.status, r.env.Message, tc.status, tc.msg)
			}
			if got := r.header.Get("Retry-After") != ""; got != tc.retryAfter {
				t.Fatalf("Retry-After %q, want present=%v", r.header.Get("Retry-After"), tc.retryAfter)
			}
			for _, leak := range []string{secretSessionKey, "session_key", "wx-secret", internalMarker} {
				if strings.Contains(string(r.body), leak) {
					t.Fatalf("response leaks %q: %s", leak, r.body)
				}
			}
			if tc.status == 200 {
				var p struct{ AccessToken, OpenID string }
				r.data(t, &p)
				if p.OpenID != "wx-openid-1" {
					t.Fatalf("openid %q", p.OpenID)
				}
				// The token works for an authenticated endpoint.
				doOn(t, e, req{path: "/api/v1/edge", token: p.AccessToken})
			}
		})
	}
	if fw.calls.Load() < int64(len(cases)) {
		t.Fatalf("fake WeChat saw %d calls", fw.calls.Load())
	}
}

func TestRefresh(t *testing.T) {
	e := newEnv(t)
	p1 := e.login("alice")

	cases := []struct {
		name, body string
		status     int
		msg        string
	}{
		{"missing", `{}`, 400, `"refresh_token" is required`},
		{"unknown field", `{"refresh":"x"}`, 400, "unknown field"},
		{"malformed", `{"refresh_token":`, 400, "not valid JSON"},
		{"unknown token", `{"refresh_token":"nope"}`, 401, "unknown refresh token"},
		{"over-long", `{"refresh_token":"` + strings.Repeat("r", 513) + `"}`, 400, "too long"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := doOn(t, e, req{method: "POST", path: refreshPath, body: tc.body})
			if r.status != tc.status || !strings.Contains(r.env.Message, tc.msg) {
				t.Fatalf("status %d message %q; want %d containing %q", r.status, r.env.Message, tc.status, tc.msg)
			}
		})
	}

	refresh := func(tok string, want int) (string, *response) {
		t.Helper()
		r := e.expect(req{method: "POST", path: refreshPath, body: map[string]string{"refresh_token": tok}}, want)
		var p struct {
			AccessToken  string `json:"access_token"`
			RefreshToken string `json:"refresh_token"`
			OpenID       string `json:"openid"`
		}
		if want == 200 {
			r.data(t, &p)
			if p.OpenID != "alice" || p.RefreshToken == "" || p.RefreshToken == tok || p.AccessToken == "" {
				t.Fatalf("refreshed pair %s", r.env.Data)
			}
			e.expect(req{path: "/api/v1/edge", token: p.AccessToken}, 200)
		}
		return p.RefreshToken, r
	}
	rt2, _ := refresh(p1.RefreshToken, 200)
	rt3, _ := refresh(rt2, 200)
	// Presenting a rotated token again is theft: 401 and the family dies.
	_, r := refresh(p1.RefreshToken, 401)
	if !strings.Contains(r.env.Message, "already used") {
		t.Fatalf("reuse message %q", r.env.Message)
	}
	if _, r = refresh(rt3, 401); !strings.Contains(r.env.Message, "log in again") {
		t.Fatalf("after reuse, the newest token: %q", r.env.Message)
	}
	// Another session of the same user is unaffected.
	p4 := e.login("alice")
	refresh(p4.RefreshToken, 200)
}

func TestAuthenticationRequired(t *testing.T) {
	e := newEnv(t)
	e.seed("dev-a", 1)
	paths := []struct{ method, path string }{
		{"GET", "/api/v1/devices"}, {"GET", "/api/v1/devices/dev-a"}, {"GET", "/api/v1/devices/dev-a/readings"},
		{"GET", "/api/v1/devices/dev-a/latest"}, {"GET", "/api/v1/devices/dev-a/stats?metric=temp"},
		{"PUT", "/api/v1/devices/dev-a/desired"}, {"PUT", "/api/v1/devices/dev-a/meta"},
		{"PUT", "/api/v1/users/bob"}, {"GET", "/api/v1/edge"}, {"GET", "/api/v1/edges/nearest?lat=1&lng=1"},
	}
	for _, p := range paths {
		for _, h := range []string{"", "Bearer", "Bearer ", "Basic abc", "bearer x", "Bearer not.a.jwt"} {
			t.Run(p.method+p.path+"/"+h, func(t *testing.T) {
				rq := req{method: p.method, path: p.path, body: `{"state":{"a":1}}`}
				if h != "" {
					rq.header = map[string]string{"Authorization": h}
				}
				r := doOn(t, e, rq)
				if r.status != 401 || !strings.HasPrefix(r.header.Get("WWW-Authenticate"), "Bearer") {
					t.Fatalf("status %d WWW-Authenticate %q: %s", r.status, r.header.Get("WWW-Authenticate"), r.body)
				}
			})
		}
	}
}

// policyEnv seeds devices across regions and users of every role.
//
//	dev-n1 north, owned by vic; dev-n2 north; dev-s1 south, owned by vic and
//	val; dev-s2 south; dev-x no region (and thus nothing but admins).
func policyEnv(t *testing.T) *testEnv {
	t.Helper()
	e := newEnv(t)
	for _, d := range []string{"dev-n1", "dev-n2", "dev-s1", "dev-s2", "dev-x"} {
		e.seed(d, 3)
	}
	e.setMeta("dev-n1", "north", "vic")
	e.setMeta("dev-n2", "north")
	e.setMeta("dev-s1", "south", "val", "vic")
	e.setMeta("dev-s2", "south")
	e.setMeta("dev-x", "")
	e.putUser("vic", []string{"viewer"}, nil)
	e.putUser("val", []string{"viewer"}, nil)
	e.putUser("opn", []string{"operator"}, []string{"north"})
	e.putUser("ops", []string{"operator"}, []string{"south", "west"})
	e.putUser("adm", []string{"admin"}, nil)
	return e
}

func (e *testEnv) listAll(tok string, limit int) []string {
	e.t.Helper()
	var ids []string
	cursor := ""
	for pages := 0; ; pages++ {
		if pages > 100 {
			e.t.Fatal("pagination does not end")
		}
		q := url.Values{"limit": {strconv.Itoa(limit)}}
		if cursor != "" {
			q.Set("cursor", cursor)
		}
		r := e.expect(req{path: "/api/v1/devices?" + q.Encode(), token: tok}, 200)
		var page struct {
			Items []struct {
				ID     string   `json:"id"`
				Owners []string `json:"owners"`
				Region string   `json:"region"`
				EdgeID string   `json:"edge_id"`
			} `json:"items"`
			NextCursor *string `json:"next_cursor"`
		}
		r.data(e.t, &page)
		if page.NextCursor == nil {
			e.t.Fatalf("page without next_cursor: %s", r.env.Data)
		}
		if len(page.Items) > limit {
			e.t.Fatalf("page of %d items, limit %d", len(page.Items), limit)
		}
		for _, it := range page.Items {
			if it.EdgeID != "edge-1" || it.Owners == nil {
				e.t.Fatalf("item %+v", it)
			}
			ids = append(ids, it.ID)
		}
		if *page.NextCursor == "" {
			return ids
		}
		cursor = *page.NextCursor
	}
}

func TestListDevicesPolicyAndPaging(t *testing.T) {
	e := policyEnv(t)
	all := []string{"dev-n1", "dev-n2", "dev-s1", "dev-s2", "dev-x"}
	cases := []struct {
		user string
		want []string
	}{
		{"vic", []string{"dev-n1", "dev-s1"}},
		{"val", []string{"dev-s1"}},
		{"opn", []string{"dev-n1", "dev-n2"}},
		{"ops", []string{"dev-s1", "dev-s2"}},
		{"adm", all},
		{"root", all}, // -admin override without a stored record
		{"nobody", nil},
	}
	for _, tc := range cases {
		for _, limit := range []int{1, 2, 50} {
			t.Run(fmt.Sprintf("%s/limit%d", tc.user, limit), func(t *testing.T) {
				got := e.listAll(e.token(tc.user), limit)
				if fmt.Sprint(got) != fmt.Sprint(tc.want) {
					t.Fatalf("%s sees %v, want %v", tc.user, got, tc.want)
				}
			})
		}
	}
	tok := e.token("adm")
	for _, q := range []string{"limit=0", "limit=-1", "limit=abc", "limit=51", "limit=1e3", "cursor=../x", "cursor=%2e%2e", "cursor=a%00b"} {
		t.Run("bad/"+q, func(t *testing.T) {
			e.expect(req{path: "/api/v1/devices?" + q, token: tok}, 400)
		})
	}
}

func TestRoleChangeTakesEffect(t *testing.T) {
	e := policyEnv(t)
	tok := e.token("newbie")
	e.expect(req{path: "/api/v1/devices/dev-s2", token: tok}, 403)
	e.expect(req{method: "PUT", path: "/api/v1/users/newbie", token: e.token("adm"),
		body: `{"roles":["operator"],"regions":["south"]}`}, 200)
	e.expect(req{path: "/api/v1/devices/dev-s2", token: tok}, 200)
	// Ownership changes take effect too.
	e.expect(req{path: "/api/v1/devices/dev-n2", token: e.token("val")}, 403)
	e.expect(req{method: "PUT", path: "/api/v1/devices/dev-n2/meta", token: e.token("root"),
		body: `{"owners":["val"],"region":"north","tags":{"floor":"3"}}`}, 200)
	e.expect(req{path: "/api/v1/devices/dev-n2", token: e.token("val")}, 200)
}

func TestGetDevice(t *testing.T) {
	e := policyEnv(t)
	cases := []struct {
		user, id string
		status   int
		msg      string
	}{
		{"vic", "dev-n1", 200, ""},
		{"vic", "dev-n2", 403, "viewer may only read devices they own"},
		{"opn", "dev-n2", 200, ""},
		{"opn", "dev-s2", 403, `operator may only act on devices in their regions; device "dev-s2" is in region "south"`},
		{"opn", "dev-x", 403, "has no region"},
		{"nobody", "dev-n1", 403, "no role on this edge"},
		{"adm", "dev-x", 200, ""},
		{"root", "dev-s2", 200, ""},
		{"adm", "missing", 404, "device missing not found"},
		{"adm", strings.Repeat("d", 65), 400, "device id must match"},
		{"adm", "a%00b", 400, "device id must match"},
		{"adm", "a%20b", 400, "device id must match"},
		{"adm", "..", 400, "device id must match"},
		{"adm", "%2e%2e", 400, "device id must match"},
		{"adm", "..%2F..%2Fetc", 400, "device id must match"},
	}
	for _, tc := range cases {
		t.Run(tc.user+"/"+tc.id, func(t *testing.T) {
			r := doOn(t, e, req{path: "/api/v1/devices/" + tc.id, token: e.token(tc.user)})
			if r.status != tc.status || !strings.Contains(r.env.Message, tc.msg) {
				t.Fatalf("status %d message %q; want %d containing %q", r.status, r.env.Message, tc.status, tc.msg)
			}
			if r.status == 200 {
				var d map[string]json.RawMessage
				r.data(t, &d)
				for _, k := range []string{"id", "edge_id", "first_seen", "last_seen", "region", "tags", "owners", "reported", "desired"} {
					if d[k] == nil {
						t.Fatalf("device view lacks %q: %s", k, r.env.Data)
					}
				}
				if string(d["id"]) != strconv.Quote(tc.id) {
					t.Fatalf("id %s", d["id"])
				}
			}
		})
	}
}

type readingJSON struct {
	TS      int64              `json:"ts"`
	ID      string             `json:"id"`
	Metrics map[string]float64 `json:"metrics"`
}

type readingsPage struct {
	Items      []readingJSON `json:"items"`
	NextCursor *string       `json:"next_cursor"`
}

func TestReadings(t *testing.T) {
	e := newEnv(t)
	e.seed("dev-a", 25)
	e.seed("dev-empty", 0)
	tok := e.token("root")
	rfc := func(ms int64) string { return time.UnixMilli(ms).UTC().Format(time.RFC3339Nano) }

	t.Run("pages", func(t *testing.T) {
		var got []readingJSON
		cursor := ""
		for pages := 0; ; pages++ {
			if pages > 10 {
				t.Fatal("pagination does not end")
			}
			q := url.Values{"limit": {"10"}, "cursor": {cursor}}
			r := e.expect(req{path: "/api/v1/devices/dev-a/readings?" + q.Encode(), token: tok}, 200)
			var p readingsPage
			r.data(t, &p)
			if p.NextCursor == nil || len(p.Items) > 10 {
				t.Fatalf("page %s", r.env.Data)
			}
			got = append(got, p.Items...)
			if *p.NextCursor == "" {
				break
			}
			cursor = *p.NextCursor
		}
		if len(got) != 25 {
			t.Fatalf("%d readings, want 25", len(got))
		}
		for i, r := range got {
			if r.TS != t0+int64(i)*1000 || r.Metrics["temp"] != float64(i) || r.Metrics["hum"] != float64(2*i) || r.ID != fmt.Sprintf("m%d", i) {
				t.Fatalf("reading %d: %+v", i, r)
			}
		}
	})

	cases := []struct {
		name  string
		query string
		n     int   // readings expected (status 200)
		first int64 // ts of the first
		code  int
		msg   string
	}{
		{"all", "", 25, t0, 200, ""},
		{"from ms", fmt.Sprintf("from=%d", t0+5000), 20, t0 + 5000, 200, ""},
		{"from to ms", fmt.Sprintf("from=%d&to=%d", t0+5000, t0+9000), 5, t0 + 5000, 200, ""},
		{"from to RFC 3339", "from=" + url.QueryEscape(rfc(t0+5000)) + "&to=" + url.QueryEscape(rfc(t0+9000)), 5, t0 + 5000, 200, ""},
		{"RFC 3339 offset", "from=" + url.QueryEscape(time.UnixMilli(t0+20000).In(time.FixedZone("CST", 8*3600)).Format(time.RFC3339)), 5, t0 + 20000, 200, ""},
		{"metric", "metric=temp&limit=3", 3, t0, 200, ""},
		{"unknown metric", "metric=nope", 0, 0, 200, ""},
		{"limit max", "limit=50", 25, t0, 200, ""},
		{"limit over max", "limit=51", 0, 0, 400, "exceeds the maximum page size 50"},
		{"limit zero", "limit=0", 0, 0, 400, "limit"},
		{"limit junk", "limit=ten", 0, 0, 400, "limit"},
		{"bad from", "from=yesterday", 0, 0, 400, "from"},
		{"bad to", "to=2024-13-01T00:00:00Z", 0, 0, 400, "to"},
		{"negative from", "from=-5", 0, 0, 400, "out of range"},
		{"huge from", "from=99999999999999999", 0, 0, 400, "out of range"},
		{"to before from", fmt.Sprintf("from=%d&to=%d", t0+5000, t0), 0, 0, 400, "to must not be before from"},
		{"bad metric", "metric=a%2Fb", 0, 0, 400, "metric"},
		{"bad cursor", "cursor=garbage", 0, 0, 400, "cursor"},
		{"bad cursor traversal", "cursor=..%2F..%2Fetc", 0, 0, 400, "cursor"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := doOn(t, e, req{path: "/api/v1/devices/dev-a/readings?" + tc.query, token: tok})
			if r.status != tc.code || !strings.Contains(r.env.Message, tc.msg) {
				t.Fatalf("status %d message %q; want %d containing %q", r.status, r.env.Message, tc.code, tc.msg)
			}
			if r.status != 200 {
				return
			}
			var p readingsPage
			r.data(t, &p)
			if len(p.Items) != tc.n || (tc.n > 0 && p.Items[0].TS != tc.first) {
				t.Fatalf("%d items starting %v; want %d from %d", len(p.Items), p.Items, tc.n, tc.first)
			}
			if !sort.SliceIsSorted(p.Items, func(i, j int) bool { return p.Items[i].TS < p.Items[j].TS }) {
				t.Fatalf("not time-ordered")
			}
			if strings.Contains(tc.query, "metric=temp") {
				for _, it := range p.Items {
					if len(it.Metrics) != 1 {
						t.Fatalf("metric filter kept %v", it.Metrics)
					}
				}
			}
		})
	}
	t.Run("device errors", func(t *testing.T) {
		e.expect(req{path: "/api/v1/devices/missing/readings", token: tok}, 404)
		e.expect(req{path: "/api/v1/devices/bad%01id/readings", token: tok}, 400)
		e.expect(req{path: "/api/v1/devices/dev-a/readings", token: e.token("stranger")}, 403)
		r := e.expect(req{path: "/api/v1/devices/dev-empty/readings", token: tok}, 200)
		var p readingsPage
		r.data(t, &p)
		if p.Items == nil || len(p.Items) != 0 || p.NextCursor == nil || *p.NextCursor != "" {
			t.Fatalf("empty device: %s", r.env.Data)
		}
	})
}

func TestLatest(t *testing.T) {
	e := policyEnv(t)
	e.seed("dev-empty", 0)
	tok := e.token("adm")
	r := e.expect(req{path: "/api/v1/devices/dev-n1/latest", token: tok}, 200)
	var got readingJSON
	r.data(t, &got)
	if got.TS != t0+2000 || got.Metrics["temp"] != 2 || got.ID != "m2" {
		t.Fatalf("latest %s", r.env.Data)
	}
	r = e.expect(req{path: "/api/v1/devices/dev-empty/latest", token: tok}, 404)
	if !strings.Contains(r.env.Message, "no readings yet") {
		t.Fatalf("message %q", r.env.Message)
	}
	e.expect(req{path: "/api/v1/devices/nope/latest", token: tok}, 404)
	e.expect(req{path: "/api/v1/devices/dev-n2/latest", token: e.token("vic")}, 403)
	e.expect(req{path: "/api/v1/devices/dev-n1/latest", token: e.token("vic")}, 200)
}

func TestStats(t *testing.T) {
	e := newEnv(t)
	e.seed("dev-a", 120) // two minutes of readings
	tok := e.token("root")
	from, to := t0, t0+119_000
	cases := []struct {
		name, query string
		code        int
		msg         string
		step        int64
	}{
		{"minute step", fmt.Sprintf("metric=temp&from=%d&to=%d&step=1m", from, to), 200, "", 60000},
		{"ms step", fmt.Sprintf("metric=temp&from=%d&to=%d&step=30000", from, to), 200, "", 30000},
		{"default step", fmt.Sprintf("metric=temp&from=%d&to=%d", from, to), 200, "", 60000},
		{"default range", "metric=temp", 200, "", 0},
		{"metric required", fmt.Sprintf("from=%d&to=%d", from, to), 400, "metric is required", 0},
		{"bad metric", "metric=a%20b", 400, "metric", 0},
		{"step zero", "metric=temp&step=0", 400, "step", 0},
		{"step negative", "metric=temp&step=-5m", 400, "step", 0},
		{"step sub-ms", "metric=temp&step=10us", 400, "step", 0},
		{"step junk", "metric=temp&step=fortnight", 400, "step", 0},
		{"too many buckets", fmt.Sprintf("metric=temp&from=0&to=%d&step=1", to), 400, "step too small", 0},
		{"bad from", "metric=temp&from=x", 400, "from", 0},
		{"to before from", fmt.Sprintf("metric=temp&from=%d&to=%d", to, from), 400, "to must not be before from", 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := doOn(t, e, req{path: "/api/v1/devices/dev-a/stats?" + tc.query, token: tok})
			if r.status != tc.code || !strings.Contains(r.env.Message, tc.msg) {
				t.Fatalf("status %d message %q; want %d containing %q", r.status, r.env.Message, tc.code, tc.msg)
			}
			if r.status != 200 {
				return
			}
			var s struct {
				Metric  string `json:"metric"`
				Step    int64  `json:"step"`
				Buckets []struct {
					TS            int64
					Count         uint64
					Min, Max, Avg float64
				} `json:"buckets"`
			}
			r.data(t, &s)
			if s.Metric != "temp" || s.Buckets == nil {
				t.Fatalf("stats %s", r.env.Data)
			}
			if tc.step == 0 {
				return
			}
			if s.Step != tc.step {
				t.Fatalf("step %d, want %d", s.Step, tc.step)
			}
			var n uint64
			lo, hi := 1e9, -1e9
			for _, b := range s.Buckets {
				n += b.Count
				lo, hi = min(lo, b.Min), max(hi, b.Max)
			}
			if n != 120 || lo != 0 || hi != 119 {
				t.Fatalf("buckets cover %d readings, min %v max %v: %s", n, lo, hi, r.env.Data)
			}
		})
	}
	e.expect(req{path: "/api/v1/devices/nope/stats?metric=temp", token: tok}, 404)
	e.expect(req{path: "/api/v1/devices/dev-a/stats?metric=temp", token: e.token("stranger")}, 403)
}

func TestPutDesired(t *testing.T) {
	e := policyEnv(t)
	path := "/api/v1/devices/dev-n1/desired"
	var versions []string

	put := func(user, body string, want int) *response {
		t.Helper()
		return e.expect(req{method: "PUT", path: path, token: e.token(user), body: body}, want)
	}
	check := func(r *response, want map[string]string) {
		t.Helper()
		var d struct {
			Desired        map[string]json.RawMessage `json:"desired"`
			DesiredVersion string                     `json:"desired_version"`
		}
		r.data(t, &d)
		if len(d.Desired) != len(want) {
			t.Fatalf("desired %s, want %v", r.env.Data, want)
		}
		for k, v := range want {
			if string(d.Desired[k]) != v {
				t.Fatalf("desired[%s] = %s, want %s", k, d.Desired[k], v)
			}
		}
		ver, err := hlc.Parse(d.DesiredVersion)
		if err != nil {
			t.Fatalf("desired_version %q: %v", d.DesiredVersion, err)
		}
		if len(versions) > 0 {
			prev, _ := hlc.Parse(versions[len(versions)-1])
			if ver <= prev {
				t.Fatalf("version %s not after %s", d.DesiredVersion, versions[len(versions)-1])
			}
		}
		versions = append(versions, d.DesiredVersion)
		// The whole desired state went out as a retained downlink.
		msgs := e.downlink.all()
		if len(msgs) != len(versions) {
			t.Fatalf("%d downlinks after %d writes", len(msgs), len(versions))
		}
		m := msgs[len(msgs)-1]
		if m.topic != "devices/dev-n1/desired" || !m.retain || m.qos != 1 {
			t.Fatalf("downlink %+v", m)
		}
		var p struct {
			Version string                     `json:"version"`
			State   map[string]json.RawMessage `json:"state"`
		}
		if err := json.Unmarshal(m.payload, &p); err != nil || p.Version != d.DesiredVersion || len(p.State) != len(want) {
			t.Fatalf("downlink payload %s (err %v), version %s", m.payload, err, d.DesiredVersion)
		}
		// And it is stored.
		dev, err := e.store.Device("dev-n1")
		if err != nil || len(dev.Desired.State()) != len(want) {
			t.Fatalf("stored desired %v, %v", dev, err)
		}
	}
	check(put("opn", `{"state":{"mode":"eco","fan":2}}`, 200), map[string]string{"mode": `"eco"`, "fan": "2"})
	check(put("opn", `{"state":{"fan":3,"led":{"on":true}}}`, 200), map[string]string{"mode": `"eco"`, "fan": "3", "led": `{"on":true}`})
	check(put("adm", `{"state":{"fan":null}}`, 200), map[string]string{"mode": `"eco"`, "led": `{"on":true}`})

	denials := []struct{ user, msg string }{
		{"vic", "viewer may only read devices; writing desired state needs the operator role"},
		{"ops", `operator may only act on devices in their regions; device "dev-n1" is in region "north"`},
		{"nobody", "no role on this edge"},
	}
	for _, d := range denials {
		r := put(d.user, `{"state":{"fan":9}}`, 403)
		if !strings.Contains(r.env.Message, d.msg) || !strings.HasPrefix(r.env.Message, "forbidden: ") {
			t.Fatalf("%s: message %q, want %q", d.user, r.env.Message, d.msg)
		}
	}
	bad := []struct{ body, msg string }{
		{`{"state":{}}`, "at least one field"},
		{`{}`, "at least one field"},
		{`{"state":[1]}`, `"state" must be an object`},
		{`{"state":{"a":1},"extra":1}`, "unknown field"},
		{`{"state":{"a":1}} x`, "trailing data"},
		{`{"state":{"":1}}`, "field name"},
		{`{"state":{"` + strings.Repeat("k", 129) + `":1}}`, "field name"},
		{`not json`, "not valid JSON"},
	}
	for _, b := range bad {
		if r := put("opn", b.body, 400); !strings.Contains(r.env.Message, b.msg) {
			t.Fatalf("body %s: message %q, want %q", truncate(b.body), r.env.Message, b.msg)
		}
	}
	if n := len(e.downlink.all()); n != 3 {
		t.Fatalf("%d downlinks after rejected writes, want 3", n)
	}
	// Bad ids are refused before anything is read.
	e.expect(req{method: "PUT", path: "/api/v1/devices/a%2Fb/desired", token: e.token("adm"), body: `{"state":{"a":1}}`}, 400)
	// A device not seen yet: pre-provisioned in the edge's region, so an
	// operator of that region may write it.
	r := e.expect(req{method: "PUT", path: "/api/v1/devices/dev-new/desired", token: e.token("opn"), body: `{"state":{"mode":"on"}}`}, 200)
	var d struct{ ID, Region string }
	r.data(t, &d)
	if d.ID != "dev-new" {
		t.Fatalf("pre-provisioned %s", r.env.Data)
	}
	e.expect(req{method: "PUT", path: "/api/v1/devices/dev-new2/desired", token: e.token("ops"), body: `{"state":{"mode":"on"}}`}, 403)
}

func TestDesiredDownlinkFailureStillStores(t *testing.T) {
	e := policyEnv(t)
	e.downlink.err = fmt.Errorf("broker down")
	e.expect(req{method: "PUT", path: "/api/v1/devices/dev-n1/desired", token: e.token("opn"), body: `{"state":{"a":1}}`}, 200)
	dev, err := e.store.Device("dev-n1")
	if err != nil || string(dev.Desired.State()["a"]) != "1" {
		t.Fatalf("desired not stored: %v %v", dev, err)
	}
}

func TestPutMeta(t *testing.T) {
	e := policyEnv(t)
	path := "/api/v1/devices/dev-n2/meta"
	adm := e.token("adm")
	r := e.expect(req{method: "PUT", path: path, token: adm, body: `{"owners":["zed","amy"],"region":"south","tags":{"floor":"2"}}`}, 200)
	var d struct {
		Owners []string          `json:"owners"`
		Region string            `json:"region"`
		Tags   map[string]string `json:"tags"`
	}
	r.data(t, &d)
	if fmt.Sprint(d.Owners) != "[amy zed]" || d.Region != "south" || d.Tags["floor"] != "2" {
		t.Fatalf("meta %s", r.env.Data)
	}
	// The placement change applies to the next decision.
	e.expect(req{path: "/api/v1/devices/dev-n2", token: e.token("ops")}, 200)
	e.expect(req{path: "/api/v1/devices/dev-n2", token: e.token("opn")}, 403)

	for _, u := range []string{"opn", "vic", "nobody"} {
		r := e.expect(req{method: "PUT", path: path, token: e.token(u), body: `{"region":"north"}`}, 403)
		if !strings.Contains(r.env.Message, "only admins may change a device's owners") {
			t.Fatalf("%s: %q", u, r.env.Message)
		}
	}
	bad := []struct{ body, msg string }{
		{`{"owners":["../x"]}`, "owners"},
		{`{"owners":["a b"]}`, "owners"},
		{`{"owners":["` + strings.Repeat("o", 129) + `"]}`, "owners"},
		{`{"owners":` + manyStrings(257) + `}`, "at most 256"},
		{`{"region":"no/where"}`, "region must match"},
		{`{"tags":{"bad key":"v"}}`, "tags"},
		{`{"tags":{"k":"` + strings.Repeat("v", 257) + `"}}`, "tags"},
		{`{"owner":["x"]}`, "unknown field"},
		{`{"owners":"x"}`, `"owners" must be an array`},
	}
	for _, b := range bad {
		if r := e.expect(req{method: "PUT", path: path, token: adm, body: b.body}, 400); !strings.Contains(r.env.Message, b.msg) {
			t.Fatalf("body %s: message %q, want %q", truncate(b.body), r.env.Message, b.msg)
		}
	}
	e.expect(req{method: "PUT", path: "/api/v1/devices/" + strings.Repeat("x", 65) + "/meta", token: adm, body: `{}`}, 400)
}

func manyStrings(n int) string {
	s := make([]string, n)
	for i := range s {
		s[i] = fmt.Sprintf("%q", fmt.Sprintf("o%d", i))
	}
	return "[" + strings.Join(s, ",") + "]"
}

func TestPutUser(t *testing.T) {
	e := policyEnv(t)
	adm := e.token("root")
	r := e.expect(req{method: "PUT", path: "/api/v1/users/carol", token: adm, body: `{"roles":["operator","viewer"],"regions":["north"]}`}, 200)
	var u struct {
		OpenID  string   `json:"openid"`
		Roles   []string `json:"roles"`
		Regions []string `json:"regions"`
	}
	r.data(t, &u)
	if u.OpenID != "carol" || fmt.Sprint(u.Roles) != "[operator viewer]" || fmt.Sprint(u.Regions) != "[north]" {
		t.Fatalf("user %s", r.env.Data)
	}
	rec, err := e.store.User("carol")
	if err != nil || fmt.Sprint(rec.Regions) != "[north]" {
		t.Fatalf("stored user %+v %v", rec, err)
	}
	r = e.expect(req{method: "PUT", path: "/api/v1/users/dave", token: adm, body: `{}`}, 200)
	r.data(t, &u)
	if u.Roles == nil || u.Regions == nil {
		t.Fatalf("empty user renders nulls: %s", r.env.Data)
	}
	for _, who := range []string{"opn", "vic", "nobody"} {
		r := e.expect(req{method: "PUT", path: "/api/v1/users/" + who, token: e.token(who), body: `{"roles":["admin"]}`}, 403)
		if !strings.Contains(r.env.Message, "only admins may change user roles") {
			t.Fatalf("%s: %q", who, r.env.Message)
		}
	}
	bad := []struct{ id, body, msg string }{
		{"x", `{"roles":["superuser"]}`, "is not one of admin, operator, viewer"},
		{"x", `{"regions":["a/b"]}`, "regions"},
		{"x", `{"regions":` + manyStrings(257) + `}`, "at most 256"},
		{"x", `{"role":["admin"]}`, "unknown field"},
		{"x", `{"roles":"admin"}`, `"roles" must be an array`},
		{"%2e%2e", `{}`, "openid must be"},
		{"a%2Fb", `{}`, "openid must be"},
		{"a%00b", `{}`, "openid must be"},
		{"a%0Ab", `{}`, "openid must be"},
		{"a..b", `{}`, "openid must be"},
		{strings.Repeat("o", 129), `{}`, "openid must be"},
	}
	for _, b := range bad {
		if r := e.expect(req{method: "PUT", path: "/api/v1/users/" + b.id, token: adm, body: b.body}, 400); !strings.Contains(r.env.Message, b.msg) {
			t.Fatalf("%s %s: message %q, want %q", truncate(b.id), truncate(b.body), r.env.Message, b.msg)
		}
	}
}

func TestEdge(t *testing.T) {
	e := newEnv(t)
	e.seed("dev-a", 4)
	last := int64(1732170000000)
	e.sync.st.Store(&linkStatus{connected: true, lastSync: time.UnixMilli(last)})
	r := e.expect(req{path: "/api/v1/edge", token: e.token("anyone")}, 200)
	var v struct {
		EdgeID   string    `json:"edge_id"`
		Region   string    `json:"region"`
		Location *Location `json:"location"`
		Cloud    struct {
			Configured, Connected bool
			LastSync              *int64 `json:"last_sync"`
			Backlog               *int64 `json:"backlog"`
		} `json:"cloud"`
		Devices  int `json:"devices"`
		Readings int `json:"readings"`
	}
	r.data(t, &v)
	if v.EdgeID != "edge-1" || v.Region != "north" || v.Location == nil || v.Location.Lat != 31.23 ||
		!v.Cloud.Configured || !v.Cloud.Connected || v.Cloud.LastSync == nil || *v.Cloud.LastSync != last || v.Cloud.Backlog == nil || *v.Cloud.Backlog == 0 ||
		v.Devices != 1 || v.Readings != 4 {
		t.Fatalf("edge %s", r.env.Data)
	}
	e.sync.st.Store(&linkStatus{})
	r = e.expect(req{path: "/api/v1/edge", token: e.token("anyone")}, 200)
	r.data(t, &v)
	if !v.Cloud.Configured || v.Cloud.Connected || v.Cloud.LastSync != nil {
		t.Fatalf("offline edge %s", r.env.Data)
	}
}

func TestNearest(t *testing.T) {
	e := newEnv(t)
	tok := e.token("anyone")
	cases := []struct {
		query string
		code  int
		msg   string
	}{
		{"lat=31.2&lng=121.5", 200, ""},
		{"lat=-90&lng=180", 200, ""},
		{"lat=31.2", 400, "both lat and lng are required"},
		{"lng=121.5", 400, "both lat and lng are required"},
		{"", 400, "both lat and lng are required"},
		{"lat=91&lng=0", 400, "lat"},
		{"lat=-90.0001&lng=0", 400, "lat"},
		{"lat=0&lng=180.5", 400, "lng"},
		{"lat=abc&lng=0", 400, "lat"},
		{"lat=0&lng=1e400", 400, "lng"},
		{"lat=NaN&lng=0", 400, "lat"},
		{"lat=0&lng=nan", 400, "lng"},
		{"lat=Inf&lng=0", 400, "lat"},
		{"lat=0&lng=0&limit=101", 400, "limit"},
		{"lat=0&lng=0&limit=0", 400, "limit"},
	}
	for _, tc := range cases {
		t.Run(tc.query, func(t *testing.T) {
			r := doOn(t, e, req{path: "/api/v1/edges/nearest?" + tc.query, token: tok})
			if r.status != tc.code || !strings.Contains(r.env.Message, tc.msg) {
				t.Fatalf("status %d message %q; want %d containing %q", r.status, r.env.Message, tc.code, tc.msg)
			}
		})
	}
	r := e.expect(req{path: "/api/v1/edges/nearest?lat=31.23&lng=121.47", token: tok}, 200)
	var v struct{ Items []wire.NearestEdge }
	r.data(t, &v)
	if len(v.Items) != 1 || v.Items[0].ID != "edge-1" || v.Items[0].URL != "https://edge-1.example" ||
		v.Items[0].DistanceKm == nil || *v.Items[0].DistanceKm > 0.001 || !v.Items[0].Healthy {
		t.Fatalf("nearest %s", r.env.Data)
	}
}

func TestNearestDirectory(t *testing.T) {
	dir := &fakeDirectory{edges: []wire.Edge{
		{ID: "e-far", Advertise: "https://b", Location: &wire.Location{Lat: 40, Lng: 116}, Healthy: true},
		{ID: "e-near", Advertise: "https://a", Location: &wire.Location{Lat: 31.01, Lng: 121}, Healthy: true},
	}}
	e := newEnv(t, withDeps(func(d *Deps) { d.Directory = dir }))
	tok := e.token("anyone")
	r := e.expect(req{path: "/api/v1/edges/nearest?lat=31&lng=121&limit=1", token: tok}, 200)
	var v struct{ Items []wire.NearestEdge }
	r.data(t, &v)
	if len(v.Items) != 1 || v.Items[0].ID != "e-near" || v.Items[0].URL != "https://a" {
		t.Fatalf("nearest %s", r.env.Data)
	}
	// The edge's item shape: the directory's other fields stay out.
	if strings.Contains(string(r.env.Data), "acked_seq") || strings.Contains(string(r.env.Data), "advertise") {
		t.Fatalf("nearest leaks directory fields: %s", r.env.Data)
	}
}

func TestHealthReadyMetrics(t *testing.T) {
	e := newEnv(t)
	e.expect(req{path: "/healthz"}, 200)
	e.expect(req{path: "/readyz"}, 200)
	reason := "disk quota reached: ingest is applying backpressure"
	e.ready.Store(&reason)
	r := e.expect(req{path: "/readyz"}, 503)
	if r.env.Message != "degraded: "+reason {
		t.Fatalf("readyz message %q", r.env.Message)
	}
	e.expect(req{path: "/healthz"}, 200) // still alive
	e.ready.Store(nil)
	e.expect(req{path: "/readyz"}, 200)

	resp, err := e.client.Get(e.base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("metrics: %d", resp.StatusCode)
	}
	for _, want := range []string{
		`outpost_http_requests_total{method="GET",route="/readyz",status="503"} 1`,
		`outpost_http_requests_total{method="GET",route="/healthz",status="200"} 2`,
		"outpost_http_request_duration_seconds_bucket",
		"outpost_policy_eval_duration_seconds",
	} {
		if !strings.Contains(string(body), want) {
			t.Fatalf("metrics lack %q:\n%s", want, body)
		}
	}
}

func TestSecurityHeaders(t *testing.T) {
	e := newEnv(t)
	for _, p := range []string{"/healthz", "/nope", "/api/v1/devices"} {
		r := e.do(req{path: p})
		for _, h := range []string{"X-Content-Type-Options", "X-Frame-Options", "Cache-Control", "Content-Security-Policy", "X-Request-Id"} {
			if r.header.Get(h) == "" {
				t.Fatalf("%s: no %s header", p, h)
			}
		}
	}
}

func TestUnknownRouteAndMethod(t *testing.T) {
	e := newEnv(t)
	tok := e.token("root")
	cases := []struct{ method, path string }{
		{"GET", "/nope"},
		{"GET", "/api/v2/devices"},
		{"GET", "/api/v1/devices/a/b/c"},
		{"POST", "/healthz"},
		{"DELETE", "/api/v1/devices/dev-a"},
		{"GET", "/api/v1/auth/login"},
		{"PATCH", "/api/v1/users/bob"},
	}
	for _, tc := range cases {
		t.Run(tc.method+tc.path, func(t *testing.T) {
			r := doOn(t, e, req{method: tc.method, path: tc.path, token: tok})
			// The catch-all answers wrong methods as unknown endpoints too.
			if r.status != 404 || !strings.Contains(r.env.Message, "no such endpoint: "+tc.method) {
				t.Fatalf("%s", r)
			}
		})
	}
}

func TestBodyLimit(t *testing.T) {
	e := newEnv(t) // 8 KiB
	// Login and refresh, read before anyone is authenticated, take at most
	// wire.MaxAuthRequestBytes.
	big := `{"code":"dev:` + strings.Repeat("a", 5<<10) + `"}`
	for _, path := range []string{loginPath, refreshPath} {
		r := e.expect(req{method: "POST", path: path, body: big}, 413)
		if !strings.Contains(r.env.Message, "at most 4096 bytes") {
			t.Fatalf("%s: message %q", path, r.env.Message)
		}
	}
	over := `{"state":{"a":"` + strings.Repeat("x", 8<<10) + `"}}`
	r := e.expect(req{method: "PUT", path: "/api/v1/devices/dev-a/desired", token: e.token("root"), body: over}, 413)
	if !strings.Contains(r.env.Message, "at most 8192 bytes") {
		t.Fatalf("message %q", r.env.Message)
	}
	// The server still answers afterwards.
	e.expect(req{path: "/healthz"}, 200)
}

func TestRateLimits(t *testing.T) {
	t.Run("per IP", func(t *testing.T) {
		e := newEnv(t, withConfig(func(c *Config) { c.RateLimitPerIP = 1 }))
		limited := 0
		for range 10 {
			r := e.do(req{method: "POST", path: loginPath, body: `{"code":"dev:alice"}`})
			if r.status == 429 {
				limited++
				if s, err := strconv.Atoi(r.header.Get("Retry-After")); err != nil || s < 1 {
					t.Fatalf("Retry-After %q", r.header.Get("Retry-After"))
				}
				if !strings.Contains(r.env.Message, "too many requests") {
					t.Fatalf("message %q", r.env.Message)
				}
			} else if r.status != 200 {
				t.Fatalf("%s", r)
			}
		}
		if limited < 5 {
			t.Fatalf("%d of 10 requests limited at 1/s with burst 3", limited)
		}
		e.expect(req{path: "/healthz"}, 200) // not rate limited
	})
	t.Run("per user", func(t *testing.T) {
		e := newEnv(t, withConfig(func(c *Config) { c.RateLimitPerUser = 1 }))
		alice, bob := e.token("alice"), e.token("bob")
		limited := 0
		for range 10 {
			r := e.do(req{path: "/api/v1/edge", token: alice})
			if r.status == 429 {
				limited++
				if r.header.Get("Retry-After") == "" {
					t.Fatal("no Retry-After")
				}
			}
		}
		if limited < 5 {
			t.Fatalf("%d of 10 requests limited", limited)
		}
		e.expect(req{path: "/api/v1/edge", token: bob}, 200) // others unaffected
	})
}

func TestInternalErrorsDoNotLeak(t *testing.T) {
	dir := &fakeDirectory{err: fmt.Errorf("dial cloud: %s", internalMarker)}
	e := newEnv(t, withDeps(func(d *Deps) {
		d.Directory = dir
		d.Store = failingStore{d.Store.(*store.Store)}
	}))
	tok := e.token("root")
	for _, rq := range []req{
		{path: "/api/v1/edges/nearest?lat=1&lng=2", token: tok},
		{path: "/api/v1/devices/boom", token: tok},
		{path: "/api/v1/devices/boom/readings", token: tok},
		{path: "/api/v1/devices/boom-panic", token: tok},
		{path: "/api/v1/devices/boom-panic/latest", token: tok},
	} {
		t.Run(rq.path, func(t *testing.T) {
			r := doOn(t, e, rq) // checks the body for internals
			if r.status != 500 || !strings.HasPrefix(r.env.Message, "internal error") {
				t.Fatalf("%s", r)
			}
			if id := r.header.Get("X-Request-Id"); id == "" || !strings.Contains(r.env.Message, id) {
				t.Fatalf("message %q does not name request id %q", r.env.Message, id)
			}
		})
	}
	e.expect(req{path: "/healthz"}, 200) // alive after a panic
	// Panics are counted like any other 500.
	resp, err := e.client.Get(e.base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, want := range []string{
		`outpost_http_requests_total{method="GET",route="/api/v1/devices/:id",status="500"} 2`,
		`outpost_http_requests_total{method="GET",route="/api/v1/devices/:id/latest",status="500"} 1`,
	} {
		if !strings.Contains(string(body), want) {
			t.Fatalf("metrics lack %q", want)
		}
	}
}
