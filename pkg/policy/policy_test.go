package policy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outpost-edge/outpost/internal/daemontest"
)

func quietLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// newEngine builds an engine on dir with its own metrics registry.
func newEngine(t testing.TB, dir string, mod func(*Config)) (*Engine, *prometheus.Registry) {
	t.Helper()
	reg := prometheus.NewRegistry()
	cfg := Config{Dir: dir, PollInterval: 10 * time.Millisecond, Registerer: reg, Logger: quietLogger()}
	if mod != nil {
		mod(&cfg)
	}
	e, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return e, reg
}

// policyCopy copies the repository's authz.rego into a fresh directory that
// a test may rewrite.
func policyCopy(t *testing.T) string {
	t.Helper()
	src, err := os.ReadFile(filepath.Join(policiesDir, "authz.rego"))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "authz.rego"), string(src))
	return dir
}

// writeFile replaces path atomically, as a deploy tool or the syncer would.
func writeFile(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func decide(t testing.TB, e *Engine, in Input) Decision {
	t.Helper()
	d, err := e.Decide(context.Background(), in)
	if err != nil {
		t.Fatalf("Decide: %v", err)
	}
	return d
}

var (
	device  = Resource{Kind: "device", ID: "d1", Owners: []string{"o-owner"}, Region: "north", Tags: map[string]string{"floor": "2"}}
	userRes = Resource{Kind: "user", ID: "o-someone"}
	edgeRes = Resource{Kind: "edge", ID: "edge-1", Region: "north"}

	admin       = User{OpenID: "o-admin", Roles: []string{"admin"}}
	opNorth     = User{OpenID: "o-op", Roles: []string{"operator"}, Regions: []string{"north"}}
	opSouth     = User{OpenID: "o-op2", Roles: []string{"operator"}, Regions: []string{"south"}}
	ownerViewer = User{OpenID: "o-owner", Roles: []string{"viewer"}}
	otherViewer = User{OpenID: "o-other", Roles: []string{"viewer"}, Regions: []string{"north"}}
	noRole      = User{OpenID: "o-nobody"}
)

func TestDecideRoleActionTable(t *testing.T) {
	e, _ := newEngine(t, policiesDir, nil)
	const (
		adminOnlyMeta  = "only admins may change a device's owners, region or tags"
		adminOnlyUsers = "only admins may change user roles and regions"
		notOwner       = "viewer may only read devices they own"
		outOfRegion    = `operator may only act on devices in their regions; device "d1" is in region "north"`
		noRoleMsg      = "you have no role on this edge; ask an admin to grant you one"
	)
	tests := []struct {
		user   User
		action string
		res    Resource
		allow  bool
		reason string // exact, or a substring when prefixed with "~"
	}{
		{admin, "device.list", device, true, "allowed as admin"},
		{admin, "device.read", device, true, "allowed as admin"},
		{admin, "device.write_desired", device, true, "allowed as admin"},
		{admin, "device.write_meta", device, true, "allowed as admin"},
		{admin, "user.write", userRes, true, "allowed as admin"},
		{admin, "edge.read", edgeRes, true, "allowed as admin, authenticated"},

		{opNorth, "device.list", device, true, "allowed as operator"},
		{opNorth, "device.read", device, true, "allowed as operator"},
		{opNorth, "device.write_desired", device, true, "allowed as operator"},
		{opNorth, "device.write_meta", device, false, adminOnlyMeta},
		{opNorth, "user.write", userRes, false, adminOnlyUsers},
		{opNorth, "edge.read", edgeRes, true, "allowed as authenticated, operator"},
		{opSouth, "device.list", device, false, outOfRegion},
		{opSouth, "device.read", device, false, outOfRegion},
		{opSouth, "device.write_desired", device, false, outOfRegion},

		{ownerViewer, "device.list", device, true, "allowed as viewer"},
		{ownerViewer, "device.read", device, true, "allowed as viewer"},
		{ownerViewer, "device.write_desired", device, false, "~viewer may only read devices; writing desired state needs the operator role"},
		{ownerViewer, "device.write_meta", device, false, adminOnlyMeta},
		{ownerViewer, "user.write", userRes, false, adminOnlyUsers},
		{ownerViewer, "edge.read", edgeRes, true, "allowed as authenticated, viewer"},
		{otherViewer, "device.list", device, false, notOwner},
		{otherViewer, "device.read", device, false, notOwner},

		{noRole, "device.read", device, false, noRoleMsg},
		{noRole, "device.list", device, false, noRoleMsg},
		{noRole, "device.write_desired", device, false, noRoleMsg},
		{noRole, "device.write_meta", device, false, adminOnlyMeta},
		{noRole, "user.write", userRes, false, adminOnlyUsers},
		{noRole, "edge.read", edgeRes, true, "allowed as authenticated"},

		{User{Roles: []string{"admin"}}, "device.read", device, false, "request is not authenticated"},
		{admin, "device.delete", device, false, `unknown action "device.delete"`},
		{admin, "device.read", userRes, false, `action device.read applies to device resources, not "user"`},
		{User{OpenID: "o-x", Roles: []string{"root"}}, "device.read", device, false, noRoleMsg},
	}
	for _, tt := range tests {
		name := fmt.Sprintf("%s/%v/%s", tt.user.OpenID, tt.user.Roles, tt.action)
		t.Run(name, func(t *testing.T) {
			d := decide(t, e, Input{User: tt.user, Action: tt.action, Resource: tt.res})
			if d.Allow != tt.allow {
				t.Fatalf("allow = %v, want %v (reason %q)", d.Allow, tt.allow, d.Reason)
			}
			if sub, ok := strings.CutPrefix(tt.reason, "~"); ok {
				if !strings.Contains(d.Reason, sub) {
					t.Fatalf("reason %q lacks %q", d.Reason, sub)
				}
			} else if d.Reason != tt.reason {
				t.Fatalf("reason = %q, want %q", d.Reason, tt.reason)
			}
		})
	}
}

func TestZeroInputDenied(t *testing.T) {
	e, _ := newEngine(t, policiesDir, nil)
	if d := decide(t, e, Input{}); d.Allow {
		t.Fatalf("zero input allowed: %+v", d)
	}
}

func TestUndefinedIsDeny(t *testing.T) {
	dir := t.TempDir()
	// No defaults: for anyone but o-x both rules are undefined.
	writeFile(t, filepath.Join(dir, "p.rego"), "package outpost.authz\nallow if input.user.openid == \"o-x\"\nreason := \"x\" if allow\n")
	e, _ := newEngine(t, dir, nil)
	if d := decide(t, e, Input{User: User{OpenID: "o-y"}, Action: "edge.read"}); d.Allow || d.Reason == "" {
		t.Fatalf("undefined decision = %+v, want a denial with a reason", d)
	}
	if d := decide(t, e, Input{User: User{OpenID: "o-x"}}); !d.Allow {
		t.Fatalf("defined decision = %+v", d)
	}
}

func TestNewFailsWithoutGoodPolicy(t *testing.T) {
	tests := map[string]map[string]string{
		"empty dir":        {},
		"only tests":       {"a_test.rego": "package x\ntest_a if true\n"},
		"syntax error":     {"p.rego": "package outpost.authz\nallow if {\n"},
		"wrong package":    {"p.rego": "package other\nallow := true\nreason := \"\"\n"},
		"rego v0 syntax":   {"p.rego": "package outpost.authz\nallow { true }\nreason = \"r\"\n"},
		"no reason rule":   {"p.rego": "package outpost.authz\nallow := true\n"},
		"unsafe variables": {"p.rego": "package outpost.authz\nallow if x\nreason := \"r\"\n"},
	}
	for name, files := range tests {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			for f, src := range files {
				writeFile(t, filepath.Join(dir, f), src)
			}
			_, err := New(context.Background(), Config{Dir: dir, Logger: quietLogger()})
			if err == nil {
				t.Fatal("New succeeded")
			}
			if name == "empty dir" && !errors.Is(err, ErrNoPolicy) {
				t.Fatalf("err = %v, want ErrNoPolicy", err)
			}
		})
	}
}

// runEngine runs e's reload loop for the rest of the test.
func runEngine(t *testing.T, e *Engine) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = e.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	daemontest.Poll(t, 10*time.Second, what, cond)
}

func TestHotReload(t *testing.T) {
	dir := policyCopy(t)
	e, reg := newEngine(t, dir, nil)
	runEngine(t, e)
	in := Input{User: otherViewer, Action: "device.read", Resource: device}
	if decide(t, e, in).Allow {
		t.Fatal("non-owner viewer allowed before reload")
	}
	v1 := e.Version()
	// An extra module widening viewers to every device in their regions.
	writeFile(t, filepath.Join(dir, "regional_viewers.rego"), `package outpost.authz
allowed_by contains "regional viewer" if {
	roles.viewer
	input.action in {"device.read", "device.list"}
	regions[resource.region]
}
`)
	eventually(t, "the new policy to take effect", func() bool { return decide(t, e, in).Allow })
	if e.Version() == v1 {
		t.Fatal("version unchanged after reload")
	}
	if got := daemontest.Metric(t, reg, "outpost_policy_reloads_total"); got != 2 {
		t.Fatalf("reloads_total = %v, want 2", got)
	}
	// Test files next to the policy are never loaded.
	writeFile(t, filepath.Join(dir, "broken_test.rego"), "this is not rego")
	if _, err := e.Reload(context.Background()); err != nil {
		t.Fatalf("Reload with a broken _test.rego: %v", err)
	}
}

func TestBrokenPolicyKeepsLastGood(t *testing.T) {
	dir := policyCopy(t)
	e, reg := newEngine(t, dir, nil)
	runEngine(t, e)
	in := Input{User: opNorth, Action: "device.write_desired", Resource: device}
	v1 := e.Version()
	failures := func() float64 { return daemontest.Metric(t, reg, "outpost_policy_reload_failures_total") }

	writeFile(t, filepath.Join(dir, "authz.rego"), "package outpost.authz\nallow if {\n")
	eventually(t, "the failure to be counted", func() bool { return failures() == 1 })
	if d := decide(t, e, in); !d.Allow {
		t.Fatalf("decision changed by a broken policy: %+v", d)
	}
	if e.Version() != v1 {
		t.Fatal("version changed by a broken policy")
	}
	// Reported once, not on every poll.
	for range 3 {
		if _, err := e.Reload(context.Background()); err != nil {
			t.Fatalf("Reload of an already reported broken version: %v", err)
		}
	}
	if got := failures(); got != 1 {
		t.Fatalf("reload_failures_total = %v after polls of the same broken file, want 1", got)
	}
	// Deleting every policy is also a failure, not a switch to deny-all.
	if err := os.Remove(filepath.Join(dir, "authz.rego")); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the deletion to be counted", func() bool { return failures() == 2 })
	if d := decide(t, e, in); !d.Allow {
		t.Fatalf("decision changed by deleting the policy: %+v", d)
	}
	// A fixed policy takes effect.
	writeFile(t, filepath.Join(dir, "authz.rego"), "package outpost.authz\nallow := false\nreason := \"maintenance\"\n")
	eventually(t, "the fixed policy", func() bool { return decide(t, e, in).Reason == "maintenance" })
}

func TestDecisionCache(t *testing.T) {
	dir := policyCopy(t)
	e, reg := newEngine(t, dir, nil)
	hits := func() float64 { return daemontest.Metric(t, reg, "outpost_policy_cache_hits_total") }
	in := Input{User: ownerViewer, Action: "device.read", Resource: device}

	first := decide(t, e, in)
	if hits() != 0 {
		t.Fatal("hit on first decision")
	}
	if again := decide(t, e, in); again != first || hits() != 1 {
		t.Fatalf("second decision %+v (hits %v), want cached %+v", again, hits(), first)
	}
	// Any change to the input is a different key; tag order is not.
	changed := in
	changed.Resource.Owners = []string{"o-someone-else"}
	if d := decide(t, e, changed); d.Allow || hits() != 1 {
		t.Fatalf("changed ownership served %+v from cache (hits %v)", d, hits())
	}
	if cacheKey(Input{Resource: Resource{Tags: map[string]string{"a": "1", "b": "2"}}}) !=
		cacheKey(Input{Resource: Resource{Tags: map[string]string{"b": "2", "a": "1"}}}) {
		t.Fatal("cache key depends on map order")
	}
	if cacheKey(Input{User: User{Roles: []string{"ab"}}}) == cacheKey(Input{User: User{Roles: []string{"a", "b"}}}) {
		t.Fatal("cache key is ambiguous")
	}

	e.InvalidateData()
	decide(t, e, in)
	if hits() != 1 {
		t.Fatal("hit after InvalidateData")
	}
	decide(t, e, in)
	if hits() != 2 {
		t.Fatal("no hit after re-population")
	}

	// A new policy version starts with an empty cache.
	writeFile(t, filepath.Join(dir, "authz.rego"), "package outpost.authz\nallow := false\nreason := \"closed\"\n")
	if changed, err := e.Reload(context.Background()); err != nil || !changed {
		t.Fatalf("Reload = %v, %v", changed, err)
	}
	if d := decide(t, e, in); d.Allow || d.Reason != "closed" {
		t.Fatalf("stale decision after policy change: %+v", d)
	}
}

func TestCacheBounded(t *testing.T) {
	e, _ := newEngine(t, policiesDir, func(c *Config) { c.CacheSize = 8 })
	for i := range 100 {
		decide(t, e, Input{User: opNorth, Action: "device.read", Resource: Resource{Kind: "device", ID: fmt.Sprint(i), Region: "north"}})
	}
	if n := e.cur.Load().cache.Len(); n > 8 {
		t.Fatalf("cache holds %d entries, bound is 8", n)
	}
}

func TestMetricsRegistered(t *testing.T) {
	e, reg := newEngine(t, policiesDir, nil)
	decide(t, e, Input{User: admin, Action: "device.read", Resource: device})
	decide(t, e, Input{User: noRole, Action: "device.read", Resource: device})
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, mf := range mfs {
		names[mf.GetName()] = true
	}
	for _, n := range []string{"outpost_policy_decisions_total", "outpost_policy_eval_duration_seconds", "outpost_policy_reloads_total", "outpost_policy_reload_failures_total", "outpost_policy_cache_hits_total"} {
		if !names[n] {
			t.Errorf("metric %s not registered", n)
		}
	}
	if daemontest.Metric(t, reg, "outpost_policy_decisions_total", "result", "allow") != 1 || daemontest.Metric(t, reg, "outpost_policy_decisions_total", "result", "deny") != 1 {
		t.Error("decisions not counted by result")
	}
	// A second engine on the same registry is a configuration error, reported.
	if _, err := New(context.Background(), Config{Dir: policiesDir, Registerer: reg, Logger: quietLogger()}); err == nil {
		t.Error("duplicate registration not reported")
	}
}

func TestBypass(t *testing.T) {
	e, _ := newEngine(t, policiesDir, func(c *Config) { c.Bypass = true })
	if d := decide(t, e, Input{}); !d.Allow {
		t.Fatal("bypass did not allow")
	}
}

func BenchmarkDecide(b *testing.B) {
	owners := make([]string, 1000)
	for i := range owners {
		owners[i] = fmt.Sprintf("o-%d", i)
	}
	bigDevice := device
	bigDevice.Owners = append(owners, "o-owner")
	cases := []struct {
		name string
		mod  func(*Config)
		in   Input
	}{
		{"cached", nil, Input{User: opNorth, Action: "device.write_desired", Resource: device}},
		{"uncached", func(c *Config) { c.CacheSize = -1 }, Input{User: opNorth, Action: "device.write_desired", Resource: device}},
		{"uncached_deny", func(c *Config) { c.CacheSize = -1 }, Input{User: opSouth, Action: "device.write_desired", Resource: device}},
		{"uncached_1k_owners", func(c *Config) { c.CacheSize = -1 }, Input{User: ownerViewer, Action: "device.read", Resource: bigDevice}},
		{"bypass", func(c *Config) { c.Bypass = true }, Input{User: opNorth, Action: "device.write_desired", Resource: device}},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			e, _ := newEngine(b, policiesDir, c.mod)
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				if _, err := e.Decide(ctx, c.in); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
