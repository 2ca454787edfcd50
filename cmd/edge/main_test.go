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

var bin = &daemontest.Binary{Name: "edge"}

// binary builds this command once per test run: the tests run the real
// binary, flags, exit codes and all.
func binary(t *testing.T) string { return bin.Path(t) }

// TestCheckConfig: -check-config exits 0 on the shipped configuration and
// prints it with every secret masked; an unknown key exits 2 naming the key;
// several mistakes exit 2 with all of them reported, each by its key.
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
	secrets := []string{"cloud-token-s3cr3t-0123456789abcdef", "mqtt-pass-s3cr3t", "wechat-s3cr3t", "$2a$10$devicehashs3cr3t"}
	withSecrets := file("secrets.yaml", `
id: e1
cloud: {urls: ["http://127.0.0.1:8090"], token: cloud-token-s3cr3t-0123456789abcdef}
mqtt: {username: edge, password: mqtt-pass-s3cr3t, devices: {d1: "$2a$10$devicehashs3cr3t"}}
wechat: {appid: wx1, secret: wechat-s3cr3t}
`)
	tests := []struct {
		name     string
		args     []string
		code     int
		want     []string // in the output
		wantNot  []string // not in the output
		wantErrs int      // problems reported ("config: N errors"), 0: not checked
	}{
		{"shipped config", []string{"-config", "../../configs/edge.yaml"}, 0,
			[]string{"id: edge-1", "max_batch: 1000", `token: ""`, "dev_login: false"}, nil, 0},
		{"development config", []string{"-config", "../../configs/dev/edge.yaml"}, 0,
			[]string{"id: edge-dev", "development: true", "dev_login: true"}, nil, 0},
		{"secrets masked", []string{"-config", withSecrets}, 0,
			[]string{"token: '***'", "password: '***'", "d1: '***'", "secret: '***'", "username: edge"}, secrets, 0},
		{"flags override the file", []string{"-config", "../../configs/edge.yaml", "-http", "127.0.0.1:9999", "-cloud", "http://c", "-cloud-token", "cloud-token-s3cr3t-0123456789abcdef"}, 0,
			[]string{"http: 127.0.0.1:9999", "token: '***'"}, secrets, 0},
		{"unknown key", []string{"-config", file("typo.yaml", "id: e1\ningest:\n  max_bacth: 10\n")}, 2,
			[]string{"max_bacth"}, nil, 0},
		{"several errors", []string{"-config", file("bad.yaml", "id: e1\nhttp: \":x\"\ningest: {quota_mb: -1, max_batch: 0}\n"), "-location", "north"}, 2,
			[]string{`http: ":x"`, "ingest.quota_mb: -1 must be ≥ 0", "ingest.max_batch: 0", "location: "}, nil, 4},
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
			for _, s := range tt.wantNot {
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
