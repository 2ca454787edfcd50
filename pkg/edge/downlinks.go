package edge

import (
	"errors"

	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// downlinks is the store's desired state seen as the retained downlinks the
// edge publishes: the embedded broker (broker.Downlinks) and the external
// broker's subscriber (ingest.Downlinks) restore a retained downlink that
// differs from it.
type downlinks struct{ st *store.Store }

// payload is the retained downlink of d, or nil when the edge publishes
// none: a device whose desired state was never written.
func payload(d *store.Device) ([]byte, error) {
	if len(d.Desired) == 0 {
		return nil, nil
	}
	return wire.DesiredPayload(d.Desired)
}

func (l downlinks) Desired(device string) ([]byte, error) {
	d, err := l.st.Device(device)
	if errors.Is(err, store.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return payload(d)
}

func (l downlinks) EachDesired(fn func(device string, payload []byte) bool) error {
	var perr error
	err := l.st.Devices("", func(d *store.Device) bool {
		p, err := payload(d)
		if err != nil {
			perr = err
			return false
		}
		return p == nil || fn(d.ID, p)
	})
	return errors.Join(err, perr)
}
