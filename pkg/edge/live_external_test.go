package edge

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
)

// mosquitto runs a private Mosquitto on a free loopback port for the test
// (skipped without the binary, failed in CI) and returns its address.
func mosquitto(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("MOSQUITTO")
	if bin == "" {
		bin, _ = exec.LookPath("mosquitto")
	}
	if bin == "" {
		if _, err := os.Stat("/usr/sbin/mosquitto"); err == nil {
			bin = "/usr/sbin/mosquitto"
		}
	}
	if bin == "" {
		const msg = "mosquitto not found: the external-broker live feed test did NOT run; apt-get install mosquitto"
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip("SKIPPED: " + msg)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	conf := fmt.Sprintf("listener %d 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nmax_inflight_messages 0\nlog_dest stderr\nlog_type error\n", port)
	if os.Geteuid() == 0 {
		conf += "user root\n"
	}
	path := filepath.Join(t.TempDir(), "mosquitto.conf")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-c", path)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return addr
		}
		if time.Now().After(deadline) {
			t.Fatalf("mosquitto not listening on %s: %v", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestLiveExternalBroker: with an external broker (a real Mosquitto), a
// reading a device publishes there reaches a phone on the edge's /mqtt
// once the edge stored it, and so does a desired-state downlink the edge
// publishes; forbidden filters are still refused.
func TestLiveExternalBroker(t *testing.T) {
	addr := mosquitto(t)
	e := liveEdge(t, func(c *Config) { c.MQTT.Listen, c.MQTT.Broker = "", "tcp://"+addr })
	root := devLogin(t, e, "root")
	msgs := make(chan string, 16)
	p := mustPhone(t, e, "p1", root)
	codes := subcodes(t, p, map[string]byte{"sensors/d1/telemetry": 1, "devices/d1/desired": 1},
		func(_ paho.Client, m paho.Message) { msgs <- m.Topic() })
	if codes["sensors/d1/telemetry"] != 1 || codes["devices/d1/desired"] != 1 {
		t.Fatalf("SUBACK %v", codes)
	}
	if c := subcodes(t, p, map[string]byte{"sensors/#": 0}, nil); c["sensors/#"] != 0x80 {
		t.Fatalf("wildcard SUBACK %#x, want 0x80", c["sensors/#"])
	}

	dev := dialDevice(t, addr, "d1")
	// The edge's subscription to the external broker may still be
	// settling: publish until the phone sees a reading.
	deadline := time.Now().Add(20 * time.Second)
	for n := 1; ; n++ {
		wait(t, dev.Publish("sensors/d1/telemetry", 1, false, reading(n)), "device publish")
		select {
		case m := <-msgs:
			if m != "sensors/d1/telemetry" {
				t.Fatalf("phone got %s first", m)
			}
		case <-time.After(200 * time.Millisecond):
			if time.Now().After(deadline) {
				t.Fatal("no reading reached the phone through the external broker within 20s")
			}
			continue
		}
		break
	}
	if st := call(t, e, "PUT", "/api/v1/devices/d1/desired", root, map[string]any{"state": map[string]any{"fan": "on"}}); st != 200 {
		t.Fatalf("put desired: %d", st)
	}
	deadline = time.Now().Add(10 * time.Second)
	for {
		select {
		case m := <-msgs:
			if m == "devices/d1/desired" {
				return
			}
		case <-time.After(time.Until(deadline)):
			t.Fatal("the desired-state downlink did not reach the phone")
		}
	}
}
