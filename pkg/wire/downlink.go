package wire

import (
	"encoding/json"

	"github.com/outpost-edge/outpost/pkg/shadow"
)

// The downlink: what an edge publishes to its devices over MQTT. A device's
// desired state goes out whole, as a retained QoS 1 message on
// DesiredTopic(device), so a device that connects later receives the latest
// at once. The API publishes it after a local write and the syncer after a
// pull changed it; both must send the same bytes for the same state.

// DesiredQoS is the MQTT QoS of the desired-state downlink. The message is
// retained.
const DesiredQoS byte = 1

// DesiredTopic is the topic a device subscribes to for its desired state.
func DesiredTopic(device string) string { return "devices/" + device + "/desired" }

// Desired is the payload of the desired-state downlink: the live fields and
// a version, the greatest stamp of the document (tombstones included), so a
// device can ignore a retained message older than one it already applied.
type Desired struct {
	Version string                     `json:"version"`
	State   map[string]json.RawMessage `json:"state"`
}

// DesiredPayload encodes a device's desired-state document as the downlink
// payload: {"version": "<greatest stamp>", "state": {...}}. Deleted fields
// are left out of state.
func DesiredPayload(desired shadow.Doc) ([]byte, error) {
	return json.Marshal(Desired{Version: desired.Version().String(), State: desired.State()})
}
