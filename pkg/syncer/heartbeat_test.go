package syncer

import (
	"testing"
	"time"

	"github.com/outpost-edge/outpost/pkg/wire"
)

// An unchanged heartbeat waits for HeartbeatRefresh (the pulls in between
// are the edge's liveness); a changed one goes after HeartbeatInterval.
func TestHeartbeatDue(t *testing.T) {
	cfg := DefaultConfig()
	if cfg.HeartbeatRefresh <= cfg.HeartbeatInterval {
		t.Fatalf("defaults: refresh %s not beyond interval %s", cfg.HeartbeatRefresh, cfg.HeartbeatInterval)
	}
	cases := []struct {
		since time.Duration
		same  bool
		want  bool
	}{
		{cfg.HeartbeatInterval - time.Millisecond, false, false},
		{cfg.HeartbeatInterval, false, true},
		{cfg.HeartbeatInterval, true, false},
		{cfg.HeartbeatRefresh - time.Millisecond, true, false},
		{cfg.HeartbeatRefresh, true, true},
		{time.Duration(1<<63 - 1), true, true}, // never sent
	}
	for _, tc := range cases {
		if got := cfg.HeartbeatDue(tc.since, tc.same); got != tc.want {
			t.Errorf("HeartbeatDue(%s, same=%v) = %v, want %v", tc.since, tc.same, got, tc.want)
		}
	}
}

func TestSameHeartbeat(t *testing.T) {
	base := func() *wire.Heartbeat {
		return &wire.Heartbeat{Edge: "e1", Region: "r", Advertise: "https://e1", Backlog: 3, OldestUnsyncedMs: 7,
			Location: &wire.Location{Lat: 1, Lng: 2}}
	}
	changes := map[string]func(h *wire.Heartbeat){
		"backlog":   func(h *wire.Heartbeat) { h.Backlog++ },
		"oldest":    func(h *wire.Heartbeat) { h.OldestUnsyncedMs = 0 },
		"region":    func(h *wire.Heartbeat) { h.Region = "s" },
		"advertise": func(h *wire.Heartbeat) { h.Advertise = "" },
		"location":  func(h *wire.Heartbeat) { h.Location = &wire.Location{Lat: 1, Lng: 3} },
		"no loc":    func(h *wire.Heartbeat) { h.Location = nil },
	}
	if !SameHeartbeat(base(), base()) {
		t.Fatal("equal heartbeats (locations equal by value) differ")
	}
	for name, change := range changes {
		h := base()
		change(h)
		if SameHeartbeat(h, base()) || SameHeartbeat(base(), h) {
			t.Errorf("a changed %s is the same heartbeat", name)
		}
	}
}
