// Package natstest runs a real NATS server with JetStream for tests: Debian's
// `nats-server` binary on a free loopback port, its store in the test's temp
// dir. A test without the binary is skipped, loudly, outside CI and fails in
// CI (CI=true), where .ci/run installs it.
package natstest

import (
	"context"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/outpost-edge/outpost/internal/daemontest"
)

// Binary returns the nats-server binary ($NATS_SERVER, /usr/sbin, $PATH),
// skipping or failing t when there is none.
func Binary(t testing.TB) string {
	t.Helper()
	for _, p := range []string{os.Getenv("NATS_SERVER"), "/usr/sbin/nats-server", "/usr/bin/nats-server"} {
		if p != "" {
			if _, err := os.Stat(p); err == nil {
				return p
			}
		}
	}
	if p, err := exec.LookPath("nats-server"); err == nil {
		return p
	}
	const msg = "nats-server not found (looked at $NATS_SERVER, /usr/sbin/nats-server and $PATH): " +
		"the JetStream test did NOT run; install it with `apt-get install nats-server`"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip("SKIPPED: " + msg)
	return ""
}

// Server is a running `nats-server -js`. Stop and Start keep its port and
// store, as a restarted server would.
type Server struct {
	t    testing.TB
	bin  string
	port int
	dir  string
	cmd  *exec.Cmd
	out  *daemontest.LockedBuffer
}

// Start starts a server for t and stops it at t's cleanup.
func Start(t testing.TB) *Server {
	t.Helper()
	s := &Server{t: t, bin: Binary(t), port: daemontest.FreePort(t), dir: t.TempDir()}
	s.Start()
	t.Cleanup(s.Stop)
	return s
}

// URL is the server's client URL.
func (s *Server) URL() string { return "nats://127.0.0.1:" + strconv.Itoa(s.port) }

// Start (re)starts the server and waits until JetStream answers.
func (s *Server) Start() {
	s.t.Helper()
	s.out = &daemontest.LockedBuffer{}
	s.cmd = exec.Command(s.bin, "-js", "-a", "127.0.0.1", "-p", strconv.Itoa(s.port), "-sd", s.dir)
	s.cmd.Stdout, s.cmd.Stderr = s.out, s.out
	if err := s.cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		err := s.ping()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("nats-server not ready within 20s: %v\n%s", err, s.out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (s *Server) ping() error {
	nc, err := nats.Connect(s.URL(), nats.NoReconnect())
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, err = js.AccountInfo(ctx)
	return err
}

// Stop kills the server (an outage, not a clean shutdown).
func (s *Server) Stop() {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Kill()
	_ = s.cmd.Wait()
	s.cmd = nil
}

// Msg is one stored message.
type Msg struct {
	ID   string // Nats-Msg-Id
	Data []byte
}

// Stream reads every message of stream, in stream order.
func (s *Server) Stream(stream string) []Msg {
	s.t.Helper()
	nc, err := nats.Connect(s.URL(), nats.NoReconnect())
	if err != nil {
		s.t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		s.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	st, err := js.Stream(ctx, stream)
	if err != nil {
		s.t.Fatalf("stream %s: %v", stream, err)
	}
	info, err := st.Info(ctx)
	if err != nil {
		s.t.Fatal(err)
	}
	var out []Msg
	for seq := info.State.FirstSeq; info.State.Msgs > 0 && seq <= info.State.LastSeq; seq++ {
		m, err := st.GetMsg(ctx, seq)
		if err != nil {
			s.t.Fatalf("stream %s message %d: %v", stream, seq, err)
		}
		out = append(out, Msg{ID: m.Header.Get(jetstream.MsgIDHeader), Data: m.Data})
	}
	return out
}
