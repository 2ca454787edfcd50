package raftnode

import (
	"bufio"
	"bytes"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// lockedBuffer is a bytes.Buffer raft's goroutines may write while the test
// reads it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (w *lockedBuffer) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *lockedBuffer) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// TestRaftLogsThroughSlog: a one-node raft start logs through the node's
// slog logger, every line a JSON record with raft's name as its component
// and its key/values as attributes, and nothing in hclog's own format
// reaches stderr.
func TestRaftLogsThroughSlog(t *testing.T) {
	// hclog's default output is os.Stderr: catch anything still sent there.
	stderr, err := os.Create(filepath.Join(t.TempDir(), "stderr"))
	if err != nil {
		t.Fatal(err)
	}
	saved := os.Stderr
	os.Stderr = stderr
	t.Cleanup(func() { os.Stderr = saved })

	var out lockedBuffer
	log := slog.New(slog.NewJSONHandler(&out, &slog.HandlerOptions{Level: slog.LevelDebug}))
	n, _, _ := startNodeLogging(t, Config{RaftLogLevel: "info"}, log)
	if !n.IsLeader() {
		t.Fatal("not leader")
	}

	// IsLeader can turn true before raft's goroutine has logged the
	// transition: wait for the line, then read everything.
	waitFor(t, "raft's leader line in the slog output", func() bool {
		return strings.Contains(out.String(), "entering leader state")
	})
	var raftLines, leaderLines int
	sc := bufio.NewScanner(strings.NewReader(out.String()))
	for sc.Scan() {
		var rec map[string]any
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			t.Fatalf("a log line is not a slog JSON record: %q", sc.Text())
		}
		comp, _ := rec["component"].(string)
		if !strings.HasPrefix(comp, "raft") {
			continue
		}
		raftLines++
		if msg, _ := rec["msg"].(string); strings.Contains(msg, "entering leader state") {
			leaderLines++
			if rec["level"] != "INFO" {
				t.Errorf("raft info line at level %v, want INFO", rec["level"])
			}
			if _, ok := rec["leader"]; !ok {
				t.Errorf("raft's key/values are not attributes: %v", rec)
			}
		}
		if lv, _ := rec["level"].(string); lv == "DEBUG" {
			t.Errorf("raft logged below its own level (info): %v", rec)
		}
	}
	if raftLines == 0 || leaderLines == 0 {
		t.Fatalf("no raft records (leader: %d) in the slog output:\n%s", leaderLines, out.String())
	}
	b, err := os.ReadFile(stderr.Name())
	if err != nil {
		t.Fatal(err)
	}
	if len(b) > 0 {
		t.Fatalf("raft wrote to stderr outside slog:\n%s", b)
	}
}
