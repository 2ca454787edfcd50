// Package daemontest is the test kit for tests that run a daemon's real
// binary (cmd/edge, cmd/cloud-sync): build it once per test run, pick free
// ports, run it to its exit code, start it until a log line, and read its
// WARN announcements; Poll, the deadline-bounded wait for a condition
// that every package's tests use instead of sleeps; and Counter, a
// Prometheus counter's value. Every helper takes the test and fails it
// itself.
package daemontest

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

	"github.com/prometheus/client_golang/prometheus"
)

// Binary builds the command in the test's package directory once per test
// run (go build .), so tests exercise the real flags and exit codes.
type Binary struct {
	Name string // file name of the built binary

	once sync.Once
	path string
	err  error
}

// Path builds the binary on first use and returns its path.
func (b *Binary) Path(t *testing.T) string {
	t.Helper()
	b.once.Do(func() {
		dir, err := os.MkdirTemp("", "outpost-"+b.Name+"-bin-")
		if err != nil {
			b.err = err
			return
		}
		b.path = filepath.Join(dir, b.Name)
		if out, err := exec.Command("go", "build", "-o", b.path, ".").CombinedOutput(); err != nil {
			b.err = errors.New(string(out))
		}
	})
	if b.err != nil {
		t.Fatalf("go build: %v", b.err)
	}
	return b.path
}

// Poll waits until cond holds, checking it every few milliseconds, and
// fails the test if it still does not after d.
func Poll(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// FreeAddr is a loopback host:port that was free a moment ago.
func FreeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// FreePort is FreeAddr's port, for a daemon that takes a port alone.
func FreePort(t testing.TB) int {
	t.Helper()
	_, port, err := net.SplitHostPort(FreeAddr(t))
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(port)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// LockedBuffer is a daemon's output, read while it runs.
type LockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *LockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *LockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// ExitCode runs cmd to completion and returns its exit code and output,
// failing the test if it is still running after 15s.
func ExitCode(t *testing.T, cmd *exec.Cmd) (int, string) {
	t.Helper()
	out := &LockedBuffer{}
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

// StartUntil starts cmd, waits for line in its log, and returns the log and
// a stop function that SIGTERMs it and wants exit 0.
func StartUntil(t *testing.T, cmd *exec.Cmd, line string) (*LockedBuffer, func()) {
	t.Helper()
	log := &LockedBuffer{}
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

// WarnLine reports whether log has a WARN line naming key.
func WarnLine(log, key string) bool {
	re := regexp.MustCompile(`(?m)^.*level=WARN .*key=` + regexp.QuoteMeta(key) + `(\s|$)`)
	return re.MatchString(log)
}

// Metric reads name from g, a counter or a gauge: the sum of its series
// that carry the given label pairs (name, value, …), as PromQL's
// sum(name{…}) would, so that no labels sum every series. A metric with
// no such series yet reads as 0: a vector's series appear on first use.
func Metric(t testing.TB, g prometheus.Gatherer, name string, labels ...string) float64 {
	t.Helper()
	if len(labels)%2 != 0 {
		t.Fatalf("Metric %s: labels %q are not name, value pairs", name, labels)
	}
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	series:
		for _, m := range mf.GetMetric() {
			have := map[string]string{}
			for _, l := range m.GetLabel() {
				have[l.GetName()] = l.GetValue()
			}
			for i := 0; i+1 < len(labels); i += 2 {
				if have[labels[i]] != labels[i+1] {
					continue series
				}
			}
			switch {
			case m.Counter != nil:
				sum += m.GetCounter().GetValue()
			case m.Gauge != nil:
				sum += m.GetGauge().GetValue()
			default:
				t.Fatalf("Metric %s: neither a counter nor a gauge", name)
			}
		}
	}
	return sum
}
