package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/outpost-edge/outpost/internal/daemontest"
)

const realToken = "4e7a9c1f3b5d8e0a2c4f6b8d0e1a3c5f"

// The real-binary helpers are the shared test kit's.
var (
	freeAddr   = daemontest.FreeAddr
	exitCode   = daemontest.ExitCode
	startUntil = daemontest.StartUntil
	warnLine   = daemontest.WarnLine
)

// TestSecurityShippedConfigs: finding 10, "the shipped configs work as
// credentials and nothing warns": configs/edge.yaml turned on dev login
// with "admin" as admin, silently. Now, on the real binary: the production
// example has neither and syncs only with a real token (a change-me or
// 8-character one exits 2 naming cloud.token), read from
// -cloud-token-file or $OUTPOST_CLOUD_TOKEN and absent from argv and from
// -check-config; the development config starts and announces, one WARN line
// each, that it is the development config, dev login, its admin and the
// open broker.
func TestSecurityShippedConfigs(t *testing.T) {
	bin := binary(t)
	dir := t.TempDir()
	file := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	prod := "../../configs/edge.yaml"
	tokFile := file("cloud-token", realToken+"\n")
	cloud := "http://" + freeAddr(t) // nothing listens: the edge keeps retrying, offline
	edge := func(args ...string) []string {
		return append([]string{"-config", prod, "-data", t.TempDir(), "-http", freeAddr(t), "-mqtt-listen", freeAddr(t),
			"-policies", "../../policies", "-cloud", cloud}, args...)
	}
	for _, tt := range []struct {
		name string
		args []string
		want string
	}{
		{"no token", edge(), "cloud.token: empty while cloud.urls are set"},
		{"placeholder token", edge("-cloud-token-file", file("placeholder", "dev-edge-1-token-change-me\n")), `cloud.token: holds the placeholder "change-me"`},
		{"short token", edge("-cloud-token", "abcdefgh"), "cloud.token: the token has 8 characters, fewer than the 32 required"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			code, out := exitCode(t, exec.Command(bin, tt.args...))
			if code != 2 || !strings.Contains(out, tt.want) {
				t.Fatalf("exit %d, want 2 mentioning %q:\n%s", code, tt.want, out)
			}
		})
	}

	t.Run("production example with a real token file", func(t *testing.T) {
		args := edge("-cloud-token-file", tokFile)
		code, out := exitCode(t, exec.Command(bin, append(args, "-check-config")...))
		if code != 0 || strings.Contains(out, realToken) || !strings.Contains(out, "token: '***'") ||
			!strings.Contains(out, "dev_login: false") || !strings.Contains(out, "admins: []") {
			t.Fatalf("-check-config: exit %d, want 0, the token masked, no dev login, no admins:\n%s", code, out)
		}
		cmd := exec.Command(bin, args...)
		log, stop := startUntil(t, cmd, "outpost edge started")
		argv, err := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/cmdline")
		if err == nil && bytes.Contains(argv, []byte(realToken)) {
			t.Errorf("the token is in the process's argv: %q", argv)
		}
		stop()
		for _, key := range []string{"development", "dev_login", "admins"} {
			if warnLine(log.String(), key) {
				t.Errorf("the production example announces %s:\n%s", key, log)
			}
		}
	})

	t.Run("token from the environment", func(t *testing.T) {
		cmd := exec.Command(bin, append(edge(), "-check-config")...)
		cmd.Env = append(os.Environ(), "OUTPOST_CLOUD_TOKEN="+realToken)
		code, out := exitCode(t, cmd)
		if code != 0 || strings.Contains(out, realToken) || !strings.Contains(out, "token: '***'") {
			t.Fatalf("exit %d, want 0 with the token masked:\n%s", code, out)
		}
	})

	t.Run("development config announces itself", func(t *testing.T) {
		log, stop := startUntil(t, exec.Command(bin, "-config", "../../configs/dev/edge.yaml", "-data", t.TempDir(),
			"-http", freeAddr(t), "-mqtt-listen", freeAddr(t), "-policies", "../../policies"), "outpost edge started")
		stop()
		for _, key := range []string{"development", "dev_login", "admins", "mqtt.devices"} {
			if !warnLine(log.String(), key) {
				t.Errorf("no WARN line for %s:\n%s", key, log)
			}
		}
	})
}
