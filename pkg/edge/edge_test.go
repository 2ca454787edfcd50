package edge

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/outpost-edge/outpost/pkg/store"
)

// testConfig is a standalone edge on loopback ports chosen by the kernel,
// in a temp data dir, with the built-in policies.
func testConfig(t *testing.T) Config {
	t.Helper()
	cfg := DefaultConfig()
	dir := t.TempDir()
	cfg.ID, cfg.DataDir, cfg.HTTP, cfg.MQTT.Listen = "e1", dir, "127.0.0.1:0", "127.0.0.1:0"
	cfg.Policy.Dir = filepath.Join(dir, "no-such-dir")
	cfg.UnsafeNoSync = true
	return cfg
}

func quiet() (*slog.Logger, *slog.LevelVar) {
	lv := new(slog.LevelVar)
	return slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: lv})), lv
}

// TestStartRunShutdown: a started edge serves HTTP and acknowledges an MQTT
// publish; on cancel Run returns, Shutdown stops every part in order and
// closes the store, and the acknowledged reading is in it.
func TestStartRunShutdown(t *testing.T) {
	cfg := testConfig(t)
	log, lv := quiet()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e, err := Start(ctx, cfg, log, lv)
	if err != nil {
		t.Fatal(err)
	}
	runErr := make(chan error, 1)
	go func() { runErr <- e.Run(ctx) }()

	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := http.Get("http://" + e.HTTPAddr() + "/healthz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("/healthz not answering 200 within 10s: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}

	c := paho.NewClient(paho.NewClientOptions().AddBroker("tcp://" + e.MQTTAddr()).SetClientID("d1").SetAutoReconnect(false))
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("connect: %v", tok.Error())
	}
	// A current ts: one older than ingest.retention (720h) is a dead letter.
	tok := c.Publish("sensors/d1/telemetry", 1, false, fmt.Sprintf(`{"ts": %d, "metrics": {"temp": 21.5}}`, time.Now().UnixMilli()))
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("publish not acknowledged: %v", tok.Error())
	}
	c.Disconnect(50)

	cancel()
	if err := <-runErr; err != nil {
		t.Fatalf("Run: %v", err)
	}
	if err := e.Shutdown(10 * time.Second); err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	// Reopening fails (locked) unless Shutdown closed the store.
	st, err := store.Open(filepath.Join(cfg.DataDir, "edge.db"), store.Options{})
	if err != nil {
		t.Fatalf("store not closed by Shutdown: %v", err)
	}
	defer st.Close()
	if n := st.Counts().Readings; n != 1 {
		t.Fatalf("%d readings stored, want the 1 acknowledged", n)
	}
}

// TestStartFailureReleasesEverything: when a late step of Start fails (the
// MQTT port is taken), what Start opened is closed again: the same data
// dir and HTTP port start right after.
func TestStartFailureReleasesEverything(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig(t)
	cfg.HTTP = free.Addr().String()
	free.Close()
	cfg.MQTT.Listen = busy.Addr().String()
	log, lv := quiet()
	if _, err := Start(context.Background(), cfg, log, lv); err == nil || !strings.Contains(err.Error(), "mqtt listen") {
		t.Fatalf("Start on a busy MQTT port = %v, want an mqtt listen error", err)
	}
	cfg.MQTT.Listen = "127.0.0.1:0"
	e, err := Start(context.Background(), cfg, log, lv)
	if err != nil {
		t.Fatalf("second Start on the same data dir and HTTP port: %v", err)
	}
	if err := e.Shutdown(10 * time.Second); err != nil {
		t.Fatal(err)
	}
}

// TestStandaloneAcksOwnOutbox: a standalone edge acknowledges its outbox
// itself, which is what lets retention prune its readings.
func TestStandaloneAcksOwnOutbox(t *testing.T) {
	st, err := store.Open(filepath.Join(t.TempDir(), "edge.db"), store.Options{EdgeID: "e1", NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	old := time.Now().Add(-48 * time.Hour).UnixMilli()
	if _, err := st.Ingest([]store.Item{{Device: "d1", ReceivedAt: old,
		Readings: []store.Reading{{TS: old, Metrics: []store.Metric{{Name: "v", Value: 1}}}}}}, nil); err != nil {
		t.Fatal(err)
	}
	cutoff := time.Now().Add(-24 * time.Hour).UnixMilli()
	if res, err := st.Prune(context.Background(), cutoff); err != nil || res.Deleted != 0 {
		t.Fatalf("before the ack, Prune deleted %d (%v): unsynced readings must stay", res.Deleted, err)
	}
	if err := ackStandaloneOutbox(st); err != nil {
		t.Fatal(err)
	}
	if c := st.Counts(); c.OutboxBacklog != 0 {
		t.Fatalf("outbox backlog %d after the standalone ack, want 0", c.OutboxBacklog)
	}
	if res, err := st.Prune(context.Background(), cutoff); err != nil || res.Deleted != 1 {
		t.Fatalf("after the ack, Prune deleted %d (%v), want 1", res.Deleted, err)
	}
}
