package edge

import (
	"errors"
	"sync/atomic"

	"github.com/outpost-edge/outpost/pkg/api"
)

// lateDownlink is the broker (or the external broker's subscriber) for the
// parts made before it: the rule runner is made before the broker, which
// needs the ingest writer (and the writer wakes the runner).
type lateDownlink struct{ d atomic.Pointer[api.Downlink] }

func (l *lateDownlink) set(d api.Downlink) { l.d.Store(&d) }

var errNoBroker = errors.New("no MQTT broker yet")

func (l *lateDownlink) Publish(topic string, payload []byte, retain bool, qos byte) error {
	d := l.d.Load()
	if d == nil || *d == nil {
		return errNoBroker
	}
	return (*d).Publish(topic, payload, retain, qos)
}
