package policy

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/daemontest"
)

// maintenance is a module that refuses everything, saying why.
const maintenance = "package outpost.authz\nallow := false\nreason := \"maintenance\"\n"

const regionalViewers = `package outpost.authz
allowed_by contains "regional viewer" if {
	roles.viewer
	input.action in {"device.read", "device.list"}
	regions[resource.region]
}
`

// listDir returns the names in dir, sorted.
func listDir(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	slices.Sort(names)
	return names
}

// Install replaces the directory's modules with the distributed set on real
// files and takes effect at once, with no poll running: new modules are
// written, ones no longer distributed removed, unsafe names confined to the
// directory or skipped, and the marker left for the next start.
func TestInstallReplacesModulesAndReloads(t *testing.T) {
	root := t.TempDir()
	dir := filepath.Join(root, "policies")
	authz, err := os.ReadFile(filepath.Join(policiesDir, "authz.rego"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(dir, "authz.rego"), string(authz))
	writeFile(t, filepath.Join(dir, "local_only.rego"), "package outpost.authz\nlocal_rule := true\n")
	writeFile(t, filepath.Join(dir, "README.txt"), "not a module")
	e, reg := newEngine(t, dir, nil) // Run is not started: only Install reloads
	in := Input{User: otherViewer, Action: "device.read", Resource: device}
	if decide(t, e, in).Allow {
		t.Fatal("non-owner viewer allowed before the install")
	}
	v1 := e.Version()

	err = e.Install(context.Background(), []Module{
		{Name: "authz.rego", Source: string(authz)},
		{Name: "regional_viewers.rego", Source: regionalViewers},
		{Name: "../escape.rego", Source: "package outpost.authz\nescaped := true\n"}, // confined to dir
		{Name: ".hidden.rego", Source: "not rego"},                                   // skipped
		{Name: "notes.md", Source: "not rego"},                                       // skipped
	})
	if err != nil {
		t.Fatalf("Install: %v", err)
	}
	if !decide(t, e, in).Allow {
		t.Fatal("the installed policy did not take effect at once")
	}
	if e.Version() == v1 {
		t.Fatal("version unchanged after install")
	}
	if got := daemontest.Metric(t, reg, "outpost_policy_reloads_total"); got != 2 {
		t.Fatalf("reloads_total = %v, want 2 (load, install)", got)
	}
	want := []string{InstalledMarker, "README.txt", "authz.rego", "escape.rego", "regional_viewers.rego"}
	if got := listDir(t, dir); !slices.Equal(got, want) {
		t.Fatalf("policy dir holds %v, want %v (no leftover temporaries, local_only.rego removed)", got, want)
	}
	if _, err := os.Stat(filepath.Join(root, "escape.rego")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a module name escaped the policy directory: %v", err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "regional_viewers.rego"))
	if err != nil || string(b) != regionalViewers {
		t.Fatalf("installed module reads %q, %v", b, err)
	}
	if fi, err := os.Stat(filepath.Join(dir, "regional_viewers.rego")); err != nil || fi.Mode().Perm() != 0o644 {
		t.Fatalf("installed module mode %v, %v; want 0644", fi.Mode(), err)
	}

	// The same set again changes nothing.
	v2 := e.Version()
	if err := e.Install(context.Background(), []Module{
		{Name: "authz.rego", Source: string(authz)},
		{Name: "regional_viewers.rego", Source: regionalViewers},
		{Name: "escape.rego", Source: "package outpost.authz\nescaped := true\n"},
	}); err != nil {
		t.Fatalf("reinstall: %v", err)
	}
	if e.Version() != v2 {
		t.Fatal("reinstalling the same modules changed the version")
	}
}

// A distributed set that does not compile is written (it is what was
// distributed) but refused: the last good policy stays in force and the
// error says so with ErrRejected; a later good set takes effect.
func TestInstallRejectedKeepsLastGood(t *testing.T) {
	dir := policyCopy(t)
	e, reg := newEngine(t, dir, nil)
	in := Input{User: opNorth, Action: "device.write_desired", Resource: device}
	v1 := e.Version()

	err := e.Install(context.Background(), []Module{{Name: "authz.rego", Source: "package outpost.authz\nallow if {\n"}})
	if !errors.Is(err, ErrRejected) {
		t.Fatalf("Install of a broken module: %v, want ErrRejected", err)
	}
	if e.Version() != v1 || !decide(t, e, in).Allow {
		t.Fatal("a rejected install changed the policy in force")
	}
	if got := daemontest.Metric(t, reg, "outpost_policy_reload_failures_total"); got != 1 {
		t.Fatalf("reload_failures_total = %v, want 1", got)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "authz.rego")); !strings.Contains(string(b), "allow if {") {
		t.Fatalf("the distributed module was not written: %q", b)
	}

	if err := e.Install(context.Background(), []Module{{Name: "authz.rego", Source: maintenance}}); err != nil {
		t.Fatalf("Install of a fixed module: %v", err)
	}
	if d := decide(t, e, in); d.Allow || d.Reason != "maintenance" {
		t.Fatalf("fixed policy not in force: %+v", d)
	}
}

// A directory that cannot be written is an ordinary error (retry later),
// not ErrRejected.
func TestInstallWriteFailure(t *testing.T) {
	dir := policyCopy(t)
	e, _ := newEngine(t, dir, nil)
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dir, []byte("a file where the directory was"), 0o644); err != nil {
		t.Fatal(err)
	}
	err := e.Install(context.Background(), []Module{{Name: "authz.rego", Source: "package outpost.authz\nallow := true\nreason := \"r\"\n"}})
	if err == nil || errors.Is(err, ErrRejected) {
		t.Fatalf("Install into a file: %v, want a write error", err)
	}
}

// Install holds the reload lock: a poll running alongside never compiles a
// half-installed set. The two sets below are only valid whole; any mix of
// their files fails to compile, which the failure counter would show.
func TestInstallIsAtomicForThePoller(t *testing.T) {
	setA := []Module{
		{Name: "p1.rego", Source: "package outpost.authz\nallow := true\n"},
		{Name: "p2.rego", Source: "package outpost.authz\nreason := \"set a\"\n"},
	}
	setB := []Module{
		{Name: "p1.rego", Source: "package outpost.authz\nreason := \"set b\"\n"},
		{Name: "p2.rego", Source: "package outpost.authz\nallow := false\n"},
	}
	dir := t.TempDir()
	for _, m := range setA {
		writeFile(t, filepath.Join(dir, m.Name), m.Source)
	}
	e, reg := newEngine(t, dir, func(c *Config) { c.PollInterval = time.Millisecond })
	runEngine(t, e)
	for i := range 30 {
		set, want := setA, "set a"
		if i%2 == 0 {
			set, want = setB, "set b"
		}
		if err := e.Install(context.Background(), set); err != nil {
			t.Fatalf("install %d: %v", i, err)
		}
		if d := decide(t, e, Input{}); d.Reason != want {
			t.Fatalf("install %d: reason %q, want %q", i, d.Reason, want)
		}
	}
	if got := daemontest.Metric(t, reg, "outpost_policy_reload_failures_total"); got != 0 {
		t.Fatalf("the poller compiled %v half-installed sets", got)
	}
}

// OnChange is called once for each new version that takes effect, by a
// reload or an install, and never for the first load, a touched file, a
// reinstalled set or a rejected one: it is what makes the edge re-check
// its phones' live subscriptions when the policy changes.
func TestOnChange(t *testing.T) {
	dir := policyCopy(t)
	var calls int // Reload and Install run on this goroutine
	e, _ := newEngine(t, dir, func(c *Config) { c.OnChange = func() { calls++ } })
	ctx := context.Background()
	steps := []struct {
		name string
		do   func() error
		want int
	}{
		{"first load", func() error { return nil }, 0},
		{"touched, not changed", func() error {
			now := time.Now().Add(time.Second)
			if err := os.Chtimes(filepath.Join(dir, "authz.rego"), now, now); err != nil {
				return err
			}
			_, err := e.Reload(ctx)
			return err
		}, 0},
		{"a module added", func() error {
			writeFile(t, filepath.Join(dir, "regional_viewers.rego"), regionalViewers)
			_, err := e.Reload(ctx)
			return err
		}, 1},
		{"installed", func() error {
			return e.Install(ctx, []Module{{Name: "authz.rego", Source: maintenance}})
		}, 2},
		{"the same set again", func() error {
			return e.Install(ctx, []Module{{Name: "authz.rego", Source: maintenance}})
		}, 2},
		{"rejected", func() error {
			if err := e.Install(ctx, []Module{{Name: "authz.rego", Source: "package outpost.authz\nallow if {\n"}}); !errors.Is(err, ErrRejected) {
				return fmt.Errorf("Install of a broken module: %v, want ErrRejected", err)
			}
			return nil
		}, 2},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if calls != s.want {
			t.Fatalf("%s: OnChange called %d times in all, want %d", s.name, calls, s.want)
		}
	}
}
