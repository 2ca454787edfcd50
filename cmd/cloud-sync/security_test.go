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

const (
	realAPI  = "8c1f0a6e2b9d4c7f8a1e3b5d7c9f0a2e"
	realEdge = "4e7a9c1f3b5d8e0a2c4f6b8d0e1a3c5f"
)

// The real-binary helpers are the shared test kit's.
var (
	freeAddr   = daemontest.FreeAddr
	exitCode   = daemontest.ExitCode
	startUntil = daemontest.StartUntil
	warnLine   = daemontest.WarnLine
)

// TestSecurityShippedConfigs: finding 10, "the shipped configs work as
// credentials and nothing warns": configs/cloud-sync.yaml held
// dev-api-token-change-me, which opened the export. Now, on the real
// binary:
//   - the production example starts only with real secrets: as it is (no
//     secret files) it exits 2 naming api_token_file; with a change-me token
//     it exits 2 naming the key; with an 8-character token it exits 2; with
//     real token files it serves, the token absent from its command line
//     (/proc/<pid>/cmdline, what ps and pprof show) and from -check-config;
//   - the same token from $OUTPOST_API_TOKEN works too;
//   - the development config starts and announces, one WARN line each, that
//     it is the development config, dev login, its admins and its
//     placeholder tokens.
func TestSecurityShippedConfigs(t *testing.T) {
	bin := binary(t)
	dir := t.TempDir()
	file := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	prod := "../../configs/cloud-sync.yaml"
	apiFile := file("secrets/api-token", realAPI+"\n")
	edgeDir := filepath.Dir(file("secrets/edge-tokens/edge-1", realEdge+"\n"))
	placeholder := file("placeholder", "dev-api-token-change-me-0123456789abcdef\n")
	short := file("short", "abcdefgh\n")
	node := func(args ...string) []string {
		return append([]string{"-config", prod, "-data", t.TempDir(), "-raft", freeAddr(t), "-http", freeAddr(t)}, args...)
	}

	for _, tt := range []struct {
		name string
		args []string
		want string
	}{
		{"production example without secrets", node(), "api_token_file: open /etc/outpost/secrets/api-token"},
		{"placeholder token", node("-api-token-file", placeholder, "-edge-tokens-file", edgeDir), `api_token: holds the placeholder "change-me"`},
		{"placeholder as a flag", node("-api-token", "dev-api-token-change-me", "-edge-tokens-file", edgeDir), `api_token: holds the placeholder "change-me"`},
		{"placeholder edge token", node("-api-token-file", apiFile, "-edge-token", "edge-1=CHANGE-ME-edge-1-token-0123456789abcdef"), `edge_tokens.edge-1: holds the placeholder`},
		{"short token", node("-api-token-file", short, "-edge-tokens-file", edgeDir), "api_token: the token has 8 characters, fewer than the 32 required"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			code, out := exitCode(t, exec.Command(bin, tt.args...))
			if code != 2 || !strings.Contains(out, tt.want) {
				t.Fatalf("exit %d, want 2 mentioning %q:\n%s", code, tt.want, out)
			}
		})
	}

	t.Run("production example with real secrets", func(t *testing.T) {
		args := node("-api-token-file", apiFile, "-edge-tokens-file", edgeDir)
		code, out := exitCode(t, exec.Command(bin, append(args, "-check-config")...))
		if code != 0 || strings.Contains(out, realAPI) || strings.Contains(out, realEdge) || !strings.Contains(out, "api_token: '***'") ||
			!strings.Contains(out, "edge-1: '***'") {
			t.Fatalf("-check-config: exit %d, want 0 with both tokens masked:\n%s", code, out)
		}
		cmd := exec.Command(bin, args...)
		log, stop := startUntil(t, cmd, "cloud-sync listening")
		argv, err := os.ReadFile("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/cmdline")
		if err == nil && (bytes.Contains(argv, []byte(realAPI)) || bytes.Contains(argv, []byte(realEdge))) {
			t.Errorf("the tokens are in the process's argv: %q", argv)
		}
		stop()
		if warnLine(log.String(), "development") || warnLine(log.String(), "dev_login") {
			t.Errorf("the production example announces development settings:\n%s", log)
		}
	})

	t.Run("token from the environment", func(t *testing.T) {
		cmd := exec.Command(bin, append(node("-edge-tokens-file", edgeDir), "-check-config")...)
		cmd.Env = append(os.Environ(), "OUTPOST_API_TOKEN="+realAPI)
		code, out := exitCode(t, cmd)
		if code != 0 || strings.Contains(out, realAPI) || !strings.Contains(out, "api_token: '***'") {
			t.Fatalf("exit %d, want 0 with the token masked:\n%s", code, out)
		}
	})

	t.Run("development config announces itself", func(t *testing.T) {
		log, stop := startUntil(t, exec.Command(bin, "-config", "../../configs/dev/cloud-sync.yaml",
			"-data", t.TempDir(), "-raft", freeAddr(t), "-http", freeAddr(t)), "cloud-sync listening")
		stop()
		for _, key := range []string{"development", "dev_login", "admins", "api_token", "edge_tokens.edge-1"} {
			if !warnLine(log.String(), key) {
				t.Errorf("no WARN line for %s:\n%s", key, log)
			}
		}
	})
}
