package ingest

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// mosquittoProc is a mosquitto that a test can stop and start again on the
// same port with its persistence file, like a broker restart in production.
type mosquittoProc struct {
	t      *testing.T
	conf   string
	addr   string
	cmd    *exec.Cmd
	exited chan struct{}
	logs   syncBuffer
}

func newPersistentMosquitto(t *testing.T) *mosquittoProc {
	t.Helper()
	bin := findMosquitto(t)
	dir := t.TempDir()
	port := freePort(t)
	conf := fmt.Sprintf(`listener %d 127.0.0.1
allow_anonymous true
persistence true
persistence_location %s/
autosave_interval 1
max_queued_messages 0
max_inflight_messages 0
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
`, port, dir)
	if os.Geteuid() == 0 {
		conf += "user root\n"
	}
	path := filepath.Join(dir, "mosquitto.conf")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	m := &mosquittoProc{t: t, conf: path, addr: fmt.Sprintf("127.0.0.1:%d", port)}
	m.cmd = exec.Command(bin)
	m.start()
	t.Cleanup(func() {
		m.stop()
		if t.Failed() {
			t.Logf("mosquitto log:\n%s", m.logs.String())
		}
	})
	return m
}

func (m *mosquittoProc) start() {
	m.t.Helper()
	m.cmd = exec.Command(m.cmd.Path, "-c", m.conf)
	m.cmd.Stdout, m.cmd.Stderr = &m.logs, &m.logs
	if err := m.cmd.Start(); err != nil {
		m.t.Fatalf("start mosquitto: %v", err)
	}
	m.exited = make(chan struct{})
	cmd, exited := m.cmd, m.exited
	go func() { cmd.Wait(); close(exited) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.DialTimeout("tcp", m.addr, time.Second); err == nil {
			c.Close()
			return
		}
		select {
		case <-exited:
			m.t.Fatalf("mosquitto exited at start: %s", m.logs.String())
		default:
		}
		if time.Now().After(deadline) {
			m.t.Fatalf("mosquitto not listening on %s: %s", m.addr, m.logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop ends mosquitto with SIGTERM, which writes its persistence file.
func (m *mosquittoProc) stop() {
	select {
	case <-m.exited:
		return
	default:
	}
	_ = m.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-m.exited:
	case <-time.After(10 * time.Second):
		_ = m.cmd.Process.Kill()
		<-m.exited
	}
}

// TestSubscriberReconnectsAfterBrokerRestart: the external broker goes away
// and comes back; the subscriber reconnects with backoff, its persistent
// session (and a fresh subscription) carries on, and what devices publish
// afterwards is stored exactly once.
func TestSubscriberReconnectsAfterBrokerRestart(t *testing.T) {
	mq := newPersistentMosquitto(t)
	st := openStore(t)
	w := NewWriter(st, NewDecoder(DefaultLimits), Config{Linger: time.Millisecond}, nil, discardLogger())
	startWriter(t, w)
	runSubscriber(t, SubscriberConfig{BrokerURL: "tcp://" + mq.addr, ClientID: "edge-reconnect", Logger: discardLogger()}, w)

	devs := []string{"r1", "r2"}
	// Publish until the subscription is in place and the first batch lands.
	deadline := time.Now().Add(20 * time.Second)
	for {
		publishN(t, mq.addr, devs, 0, 20)
		if c := st.Counts(); c.Readings >= uint64(len(devs)*20) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("subscriber never subscribed")
		}
		time.Sleep(100 * time.Millisecond)
	}
	waitStored(t, st, devs, 20)

	mq.stop()
	mq.start()
	publishN(t, mq.addr, devs, 20, 60)
	waitStored(t, st, devs, 60)
}
