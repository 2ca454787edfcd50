package main

import (
	"bytes"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const realToken = "4e7a9c1f3b5d8e0a2c4f6b8d0e1a3c5f"

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// lockedBuffer is a daemon's stderr, read while it runs.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func exitCode(t *testing.T, cmd *exec.Cmd) (int, string) {
	t.Helper()
	out := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	var err error
	select {
	case err = <-exited:
	case <-time.After(15 * time.Second):
		// It started instead of refusing its configuration.
		_ = cmd.Process.Kill()
		<-exited
		t.Fatalf("still running after 15s (it accepted its configuration):\n%s", out)
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode(), out.String()
	} else if err != nil {
		t.Fatal(err)
	}
	return 0, out.String()
}

// startUntil starts cmd, waits for line in its log, and returns the log and
// a stop function that SIGTERMs it and wants exit 0.
func startUntil(t *testing.T, cmd *exec.Cmd, line string) (*lockedBuffer, func()) {
	t.Helper()
	log := &lockedBuffer{}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(log.String(), line) {
		select {
		case err := <-exited:
			t.Fatalf("exited before %q: %v\n%s", line, err, log)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			t.Fatalf("no %q within 20s:\n%s", line, log)
		}
	}
	return log, func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			if err != nil {
				t.Fatalf("exit after SIGTERM: %v\n%s", err, log)
			}
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			t.Fatal("no exit within 15s of SIGTERM")
		}
	}
}

func warnLine(log, key string) bool {
	re := regexp.MustCompile(`(?m)^.*level=WARN .*key=` + regexp.QuoteMeta(key) + `(\s|$)`)
	return re.MatchString(log)
}

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
