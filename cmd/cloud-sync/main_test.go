package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/outpost-edge/outpost/internal/daemontest"
)

var bin = &daemontest.Binary{Name: "cloud-sync"}

// binary builds this command once per test run: the tests run the real
// binary, flags, exit codes and all.
func binary(t *testing.T) string { return bin.Path(t) }

// TestCheckConfig: -check-config exits 0 on the development configuration and
// prints it with every secret masked (the shipped file's development tokens
// included); an unknown key exits 2 naming the key; several mistakes exit 2
// with all of them reported, each by its key.
func TestCheckConfig(t *testing.T) {
	bin := binary(t)
	dir := t.TempDir()
	file := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	shipped := "../../configs/dev/cloud-sync.yaml" // runs as it is
	secrets := []string{"dev-edge-1-token-change-me", "dev-api-token-change-me", "wechat-s3cr3t", "edge-token-s3cr3t"}
	tests := []struct {
		name     string
		args     []string
		code     int
		want     []string // in the output
		wantErrs int      // problems reported ("config: N errors"), 0: not checked
	}{
		{"shipped config", []string{"-config", shipped}, 0,
			[]string{"id: node1", "edge-1: '***'", "api_token: '***'", "snapshot_interval: 30s", "snapshot_threshold: 2048", "trailing_logs: 1024"}, 0},
		{"flags override the file, secrets masked", []string{"-config", shipped, "-id", "n2", "-wechat-appid", "wx", "-wechat-secret", "wechat-s3cr3t", "-edge-token", "e9=edge-token-s3cr3t"}, 0,
			[]string{"id: n2", "wechat_secret: '***'", "e9: '***'"}, 0},
		{"unknown key", []string{"-config", file("typo.yaml", "id: n1\nsnapshot_intervall: 10s\n")}, 2,
			[]string{"snapshot_intervall"}, 0},
		{"several errors", []string{"-config", file("bad.yaml", "id: n1\nhttp: \":x\"\nmax_inflight_entries: 0\nheartbeat_fresh: -1s\n"), "-bootstrap", "-join", "http://n0:8090"}, 2,
			[]string{`http: ":x"`, "max_inflight_entries: 0 must be at least 1", "heartbeat_fresh: -1s", "join: -bootstrap and -join are mutually exclusive"}, 4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, err := exec.Command(bin, append(tt.args, "-check-config")...).CombinedOutput()
			code := 0
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				code = ee.ExitCode()
			} else if err != nil {
				t.Fatal(err)
			}
			if code != tt.code {
				t.Fatalf("exit %d, want %d; output:\n%s", code, tt.code, out)
			}
			for _, w := range tt.want {
				if !strings.Contains(string(out), w) {
					t.Errorf("output lacks %q:\n%s", w, out)
				}
			}
			for _, s := range secrets {
				if strings.Contains(string(out), s) {
					t.Errorf("output shows the secret %q:\n%s", s, out)
				}
			}
			if n := tt.wantErrs; n > 0 && !strings.Contains(string(out), fmt.Sprintf("config: %d errors: ", n)) {
				t.Errorf("want %d problems reported together:\n%s", n, out)
			}
		})
	}
}
