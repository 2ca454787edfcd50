package api

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/outpost-edge/outpost/pkg/broker"
	"github.com/outpost-edge/outpost/pkg/store"
)

// raw is an HTTP answer as it came off the wire: the client neither adds
// Accept-Encoding nor decompresses (Go's transport does both by default).
type raw struct {
	status int
	header http.Header
	body   []byte
}

func (e *testEnv) raw(path, token string, header map[string]string) raw {
	e.t.Helper()
	hr, err := http.NewRequest(http.MethodGet, e.base+path, nil)
	if err != nil {
		e.t.Fatal(err)
	}
	if token != "" {
		hr.Header.Set("Authorization", "Bearer "+token)
	}
	for k, v := range header {
		hr.Header.Set(k, v)
	}
	cl := &http.Client{Transport: &http.Transport{DisableCompression: true}, Timeout: 30 * time.Second}
	defer cl.CloseIdleConnections()
	resp, err := cl.Do(hr)
	if err != nil {
		e.t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	return raw{resp.StatusCode, resp.Header, b}
}

func gunzip(t *testing.T, b []byte) []byte {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("not gzip: %v", err)
	}
	out, err := io.ReadAll(zr)
	if err != nil {
		t.Fatalf("gunzip: %v", err)
	}
	return out
}

// TestGzip: bodies of 1 KiB and more are gzipped when the client accepts
// gzip, and only then; smaller ones never; every answer says Vary.
func TestGzip(t *testing.T) {
	e := newEnv(t)
	e.seed("dev-a", 50)
	tok := e.token("root")
	big := "/api/v1/devices/dev-a/readings?limit=50"
	small := "/api/v1/devices/dev-a/latest"
	identity := e.raw(big, tok, nil)
	if identity.status != 200 || len(identity.body) < compressMin {
		t.Fatalf("uncompressed page: %d, %d bytes; the test needs one over %d", identity.status, len(identity.body), compressMin)
	}
	cases := []struct {
		name, path, accept string
		gzipped            bool
	}{
		{"big, gzip", big, "gzip", true},
		{"big, gzip among others", big, "br;q=1.0, gzip;q=0.8, *;q=0.1", true},
		{"big, wildcard", big, "*", true},
		{"big, no header", big, "", false},
		{"big, gzip refused", big, "gzip;q=0", false},
		{"big, identity only", big, "identity", false},
		{"small, gzip", small, "gzip", false},
		{"small error, gzip", "/api/v1/devices/nope", "gzip", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			h := map[string]string{}
			if tc.accept != "" {
				h["Accept-Encoding"] = tc.accept
			}
			r := e.raw(tc.path, tok, h)
			if !strings.Contains(r.header.Get("Vary"), "Accept-Encoding") {
				t.Errorf("Vary %q", r.header.Get("Vary"))
			}
			got := r.header.Get("Content-Encoding") == "gzip"
			if got != tc.gzipped {
				t.Fatalf("Content-Encoding %q (%d bytes), want gzip=%v", r.header.Get("Content-Encoding"), len(r.body), tc.gzipped)
			}
			if !got {
				if !json.Valid(r.body) {
					t.Fatalf("identity body is not JSON: %q", r.body)
				}
				return
			}
			if len(r.body) >= len(identity.body) {
				t.Errorf("gzip body %d bytes, identity %d", len(r.body), len(identity.body))
			}
			if plain := gunzip(t, r.body); !bytes.Equal(plain, identity.body) {
				t.Fatalf("gunzipped body differs from the identity one:\n%s\n%s", plain, identity.body)
			}
			if r.header.Get("ETag") != identity.header.Get("ETag") {
				t.Errorf("ETag %q gzipped, %q identity: one answer, one (weak) tag", r.header.Get("ETag"), identity.header.Get("ETag"))
			}
		})
	}
}

// TestETag: every revalidatable read carries a weak ETag and
// "private, no-cache", answers its own ETag with an empty 304, and gets a
// new ETag when what it shows changes; open ranges and tokens are
// no-store without an ETag.
func TestETag(t *testing.T) {
	e := newEnv(t)
	e.seed("dev-a", 30)
	tok := e.token("root")
	closed := fmt.Sprintf("from=%d&to=%d", t0, t0+29_000)
	late := func() {
		t.Helper()
		_, err := e.store.Ingest([]store.Item{{Device: "dev-a", ReceivedAt: t0, Readings: []store.Reading{
			{TS: t0 + 500, ID: fmt.Sprintf("late-%d", time.Now().UnixNano()), Metrics: []store.Metric{{Name: "temp", Value: 99}}}}}}, nil)
		if err != nil {
			t.Fatal(err)
		}
	}
	newer := func() {
		t.Helper()
		_, err := e.store.Ingest([]store.Item{{Device: "dev-a", ReceivedAt: t0, Readings: []store.Reading{
			{TS: t0 + 3_600_000, ID: "newer", Metrics: []store.Metric{{Name: "temp", Value: 7}}}}}}, nil)
		if err != nil {
			t.Fatal(err)
		}
	}
	cases := []struct {
		name, path string
		change     func()
	}{
		{"device", "/api/v1/devices/dev-a", func() { e.setMeta("dev-a", "north", "alice") }},
		{"list", "/api/v1/devices", func() { e.seed("dev-b", 1) }},
		{"list with latest", "/api/v1/devices?include=latest", newer},
		{"closed range of readings", "/api/v1/devices/dev-a/readings?" + closed, late},
		{"stats", "/api/v1/devices/dev-a/stats?metric=temp&step=1m&" + closed, late},
		{"latest", "/api/v1/devices/dev-a/latest", func() {
			_, err := e.store.Ingest([]store.Item{{Device: "dev-a", ReceivedAt: t0, Readings: []store.Reading{
				{TS: t0 + 7_200_000, ID: "newest", Metrics: []store.Metric{{Name: "temp", Value: 8}}}}}}, nil)
			if err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			first := e.raw(tc.path, tok, nil)
			tag := first.header.Get("ETag")
			if first.status != 200 || !strings.HasPrefix(tag, `W/"`) {
				t.Fatalf("%d, ETag %q", first.status, tag)
			}
			if cc := first.header.Get("Cache-Control"); cc != "private, no-cache" {
				t.Fatalf("Cache-Control %q", cc)
			}
			for _, inm := range []string{tag, strings.TrimPrefix(tag, "W/"), `"other", ` + tag, "*"} {
				nm := e.raw(tc.path, tok, map[string]string{"If-None-Match": inm})
				if nm.status != 304 || len(nm.body) != 0 || nm.header.Get("ETag") != tag {
					t.Fatalf("If-None-Match %s: %d, %d bytes, ETag %q; want an empty 304 with the tag", inm, nm.status, len(nm.body), nm.header.Get("ETag"))
				}
			}
			if other := e.raw(tc.path, tok, map[string]string{"If-None-Match": `W/"stale"`}); other.status != 200 || !bytes.Equal(other.body, first.body) {
				t.Fatalf("a stale tag: %d", other.status)
			}
			tc.change()
			after := e.raw(tc.path, tok, map[string]string{"If-None-Match": tag})
			if after.status != 200 || after.header.Get("ETag") == tag || after.header.Get("ETag") == "" {
				t.Fatalf("after a change: %d, ETag %q (was %q)", after.status, after.header.Get("ETag"), tag)
			}
		})
	}

	// Another user sees another list, under another tag: the tag is of
	// what this caller receives.
	e.setMeta("dev-a", "north", "bob")
	e.putUser("bob", []string{"viewer"}, nil)
	root := e.raw("/api/v1/devices", tok, nil)
	bob := e.raw("/api/v1/devices", e.token("bob"), map[string]string{"If-None-Match": root.header.Get("ETag")})
	if bob.status != 200 || bob.header.Get("ETag") == root.header.Get("ETag") {
		t.Fatalf("bob's list answered %d with root's tag", bob.status)
	}

	for _, tc := range []struct{ name, path string }{
		{"open range", "/api/v1/devices/dev-a/readings"},
		{"range ending in the future", fmt.Sprintf("/api/v1/devices/dev-a/readings?from=%d&to=%d", t0, time.Now().Add(time.Hour).UnixMilli())},
		{"error", "/api/v1/devices/nope"},
		{"edge status", "/api/v1/edge"},
	} {
		r := e.raw(tc.path, tok, nil)
		if r.header.Get("ETag") != "" || r.header.Get("Cache-Control") != "no-store" {
			t.Errorf("%s: ETag %q, Cache-Control %q; want none and no-store", tc.name, r.header.Get("ETag"), r.header.Get("Cache-Control"))
		}
	}
	for _, path := range []string{"/api/v1/auth/login", "/api/v1/auth/refresh"} {
		body := map[string]string{"code": "dev:root"}
		if strings.HasSuffix(path, "refresh") {
			body = map[string]string{"refresh_token": e.login("root").RefreshToken}
		}
		r := e.expect(req{method: http.MethodPost, path: path, body: body}, 200)
		if r.header.Get("ETag") != "" || r.header.Get("Cache-Control") != "no-store" {
			t.Errorf("%s: ETag %q, Cache-Control %q; tokens must be no-store", path, r.header.Get("ETag"), r.header.Get("Cache-Control"))
		}
	}
}

// listedDevice is a device of a list page; Latest is nil when the key is
// absent and "null" when it is null.
type listedDevice struct {
	ID     string
	Online *bool
	Latest *json.RawMessage
}

func (e *testEnv) list(tok, query string) []listedDevice {
	e.t.Helper()
	r := e.expect(req{path: "/api/v1/devices" + query, token: tok}, 200)
	var p struct {
		Items []map[string]json.RawMessage `json:"items"`
	}
	r.data(e.t, &p)
	out := make([]listedDevice, len(p.Items))
	for i, m := range p.Items {
		_ = json.Unmarshal(m["id"], &out[i].ID)
		if v, ok := m["online"]; ok {
			var b bool
			_ = json.Unmarshal(v, &b)
			out[i].Online = &b
		}
		if v, ok := m["latest"]; ok {
			out[i].Latest = &v
		}
	}
	return out
}

// TestIncludeLatest: include=latest adds each listed device's newest
// reading, the same as /latest gives, and null for a device without one;
// without it there is no latest key; other values are refused.
func TestIncludeLatest(t *testing.T) {
	e := newEnv(t)
	e.seed("dev-a", 5)
	e.seed("dev-b", 3)
	e.seed("dev-empty", 0)
	tok := e.token("root")
	items := e.list(tok, "?include=latest")
	if len(items) != 3 {
		t.Fatalf("%d devices", len(items))
	}
	for _, it := range items {
		if it.Latest == nil {
			t.Fatalf("%s: no latest key", it.ID)
		}
		if it.ID == "dev-empty" {
			if string(*it.Latest) != "null" {
				t.Fatalf("dev-empty latest %s, want null", *it.Latest)
			}
			continue
		}
		one := e.expect(req{path: "/api/v1/devices/" + it.ID + "/latest", token: tok}, 200)
		if !bytes.Equal(*it.Latest, one.env.Data) {
			t.Fatalf("%s: listed latest %s, /latest %s", it.ID, *it.Latest, one.env.Data)
		}
	}
	for _, it := range e.list(tok, "") {
		if it.Latest != nil {
			t.Fatalf("%s: latest without include", it.ID)
		}
	}
	r := e.expect(req{path: "/api/v1/devices?include=everything", token: tok}, 400)
	if !strings.Contains(r.env.Message, "include") {
		t.Fatalf("message %q", r.env.Message)
	}
}

func onlineOf(t *testing.T, e *testEnv, tok, id string) bool {
	t.Helper()
	var d struct {
		Online *bool `json:"online"`
	}
	e.expect(req{path: "/api/v1/devices/" + id, token: tok}, 200).data(t, &d)
	if d.Online == nil {
		t.Fatalf("%s: no online key", id)
	}
	return *d.Online
}

// TestOnlineEmbeddedBroker: with the embedded broker, a device is online
// while a real MQTT client of it is connected, on the device and in the
// list, and the device's ETag changes with it.
func TestOnlineEmbeddedBroker(t *testing.T) {
	brk, err := broker.New(broker.Config{Listen: "127.0.0.1:0", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := brk.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { brk.Close() })
	e := newEnv(t, withDeps(func(d *Deps) { d.Presence = brk }))
	e.seed("dev-a", 1)
	tok := e.token("root")
	waitOnline := func(want bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); onlineOf(t, e, tok, "dev-a") != want; time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("online stayed %v", !want)
			}
		}
		if items := e.list(tok, ""); len(items) != 1 || items[0].Online == nil || *items[0].Online != want {
			t.Fatalf("list: %+v, want online=%v", items, want)
		}
	}
	waitOnline(false)
	offTag := e.raw("/api/v1/devices/dev-a", tok, nil).header.Get("ETag")

	c := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + brk.Addr()).SetClientID("dev-a").
		SetAutoReconnect(false).SetConnectTimeout(5 * time.Second))
	if tk := c.Connect(); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("connect: %v", tk.Error())
	}
	waitOnline(true)
	if on := e.raw("/api/v1/devices/dev-a", tok, map[string]string{"If-None-Match": offTag}); on.status != 200 {
		t.Fatalf("going online kept the ETag: %d", on.status)
	}
	c.Disconnect(50)
	waitOnline(false)
}

// TestOnlineFromLastSeen: without a broker's presence (external-broker
// mode) a device is online if seen within OnlineWindow.
func TestOnlineFromLastSeen(t *testing.T) {
	e := newEnv(t, withConfig(func(c *Config) { c.OnlineWindow = time.Minute }))
	seen := time.Now().UnixMilli()
	if _, err := e.store.Ingest([]store.Item{{Device: "dev-a", ReceivedAt: seen, Readings: []store.Reading{
		{TS: seen, ID: "r1", Metrics: []store.Metric{{Name: "temp", Value: 1}}}}}}, nil); err != nil {
		t.Fatal(err)
	}
	e.seed("dev-old", 1) // seen at t0, long ago
	tok := e.token("root")
	for _, tc := range []struct {
		id    string
		shift time.Duration
		want  bool
	}{
		{"dev-a", 0, true},
		{"dev-old", 0, false},
		{"dev-a", 2 * time.Minute, false},
	} {
		e.clock.shift(tc.shift)
		if got := onlineOf(t, e, tok, tc.id); got != tc.want {
			t.Errorf("%s at +%s: online %v, want %v", tc.id, tc.shift, got, tc.want)
		}
		e.clock.reset()
	}
}

// TestRefreshReuseGraceHTTP: over HTTP, a refresh retried within the grace
// answers the identical pair, whose tokens work; the same retry after the
// grace is a reuse: 401, the session revoked, its access tokens refused.
func TestRefreshReuseGraceHTTP(t *testing.T) {
	e := newEnv(t)
	p0 := e.login("alice")
	refresh := func(tok string, want int) *response {
		t.Helper()
		return e.expect(req{method: http.MethodPost, path: "/api/v1/auth/refresh", body: map[string]string{"refresh_token": tok}}, want)
	}
	first := refresh(p0.RefreshToken, 200)
	retry := refresh(p0.RefreshToken, 200)
	if !bytes.Equal(first.env.Data, retry.env.Data) {
		t.Fatalf("retry within the grace got another pair:\n%s\n%s", retry.env.Data, first.env.Data)
	}
	var p1 struct {
		AccessToken  string `json:"access_token"`
		RefreshToken string `json:"refresh_token"`
	}
	retry.data(t, &p1)
	e.expect(req{path: "/api/v1/edge", token: p1.AccessToken}, 200)

	e.clock.set(t, 31*time.Second) // past the default grace of 30 s
	r := refresh(p0.RefreshToken, 401)
	if !strings.Contains(r.env.Message, "already used") {
		t.Fatalf("reuse after the grace: %q", r.env.Message)
	}
	e.expect(req{path: "/api/v1/edge", token: p1.AccessToken}, 401)
	refresh(p1.RefreshToken, 401)
}
