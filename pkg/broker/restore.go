package broker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/outpost-edge/outpost/pkg/ident"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Downlinks is the edge's record of the retained desired-state downlinks it
// publishes (the store's desired state, encoded by wire.DesiredPayload).
// The broker holds the retained copy of each to it: what differs, whoever
// changed or erased it, is replaced by the edge's.
type Downlinks interface {
	// Desired returns the payload the edge publishes retained on
	// wire.DesiredTopic(device), or nil when it publishes none (no desired
	// state, or a device this edge does not know).
	Desired(device string) ([]byte, error)
	// EachDesired calls fn for every device with a desired-state downlink
	// until fn returns false.
	EachDesired(fn func(device string, payload []byte) bool) error
}

// desiredDevice returns the device of a devices/{id}/desired topic.
func desiredDevice(topic string) (string, bool) {
	rest, ok := strings.CutPrefix(topic, devicesPrefix)
	if !ok {
		return "", false
	}
	dev, ok := strings.CutSuffix(rest, "/desired")
	if !ok || !ident.DeviceID(dev) {
		return "", false
	}
	return dev, true
}

// restorer republishes the edge's desired state over retained downlinks
// changed or cleared by anyone but the edge. Since only the edge may publish
// below devices/ this should not happen on a running broker; it still can
// through a state file written by an older edge (whose broker let any
// client set a retained Will there) or edited by hand, which the start-up
// sweep repairs, and the hook is the second line behind the ACL.
type restorer struct {
	srv  *mqtt.Server
	src  Downlinks
	log  *slog.Logger
	met  *metrics
	jobs chan string

	mu      sync.Mutex
	pending map[string]bool
}

func newRestorer(srv *mqtt.Server, src Downlinks, log *slog.Logger, met *metrics) *restorer {
	return &restorer{srv: srv, src: src, log: log, met: met, jobs: make(chan string, 1024), pending: map[string]bool{}}
}

// enqueue asks for device's downlink to be checked, once however often it
// is asked before the check runs. It never blocks a client's goroutine: a
// full queue drops the request (the next sweep, at start, repairs it).
func (r *restorer) enqueue(device string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.pending[device] {
		return
	}
	select {
	case r.jobs <- device:
		r.pending[device] = true
	default:
		r.log.Warn("downlink restore queue full; dropped", "device", device)
	}
}

func (r *restorer) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case dev := <-r.jobs:
			r.mu.Lock()
			delete(r.pending, dev)
			r.mu.Unlock()
			if err := r.check(dev); err != nil {
				r.log.Warn("restoring retained downlink failed", "device", dev, "err", err)
			}
		}
	}
}

func (r *restorer) retained(topic string) []byte {
	for _, pk := range r.srv.Topics.Messages(topic) {
		if pk.TopicName == topic {
			return pk.Payload
		}
	}
	return nil
}

// check makes device's retained downlink the edge's. A write of desired
// state racing with it commits, then publishes: reading the store again
// after publishing and going round while it changed means the last retained
// message is the newest state either way.
func (r *restorer) check(device string) error {
	topic := wire.DesiredTopic(device)
	want, err := r.src.Desired(device)
	if err != nil {
		return err
	}
	for range 3 {
		if got := r.retained(topic); !bytes.Equal(got, want) {
			r.log.Warn("retained downlink differs from the edge's desired state; restoring it", "device", device,
				"retained_bytes", len(got), "desired_bytes", len(want))
			// An empty retained payload clears the retained message.
			if err := r.srv.Publish(topic, want, true, wire.DesiredQoS); err != nil {
				return fmt.Errorf("republish %s: %w", topic, err)
			}
			r.met.restored.Inc()
		}
		again, err := r.src.Desired(device)
		if err != nil {
			return err
		}
		if bytes.Equal(again, want) {
			return nil
		}
		want = again
	}
	return nil
}

// sweep checks every retained downlink and every downlink the edge has.
func (r *restorer) sweep() error {
	seen := map[string]bool{}
	for _, pk := range r.srv.Topics.Messages("devices/+/desired") {
		if dev, ok := desiredDevice(pk.TopicName); ok {
			seen[dev] = true
		}
	}
	var devs []string
	err := r.src.EachDesired(func(dev string, payload []byte) bool {
		if !seen[dev] || !bytes.Equal(r.retained(wire.DesiredTopic(dev)), payload) {
			devs = append(devs, dev)
		}
		delete(seen, dev)
		return true
	})
	if err != nil {
		return fmt.Errorf("list desired state: %w", err)
	}
	for dev := range seen { // retained, but not the edge's
		devs = append(devs, dev)
	}
	var errs []error
	for _, dev := range devs {
		if err := r.check(dev); err != nil {
			errs = append(errs, fmt.Errorf("device %s: %w", dev, err))
		}
	}
	return errors.Join(errs...)
}

// restoreHook reports retained changes below devices/ made by anyone but
// the edge (a client publish, a Will) to the restorer.
type restoreHook struct {
	mqtt.HookBase
	r *restorer
}

func (h *restoreHook) ID() string { return "outpost-restore-downlink" }

func (h *restoreHook) Provides(b byte) bool { return b == mqtt.OnRetainMessage }

func (h *restoreHook) OnRetainMessage(cl *mqtt.Client, pk packets.Packet, _ int64) {
	if cl != nil && cl.Net.Inline {
		return
	}
	if dev, ok := desiredDevice(pk.TopicName); ok {
		h.r.enqueue(dev)
	}
}
