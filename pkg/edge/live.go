package edge

import (
	"errors"

	"github.com/outpost-edge/outpost/pkg/api"
	"github.com/outpost-edge/outpost/pkg/broker"
)

// phoneAuth is the broker's view of the API's token verification and
// policy (broker.PhoneAuth): phones connecting to /mqtt are verified as
// HTTP requests are. srv is set once the API is built, before it serves.
type phoneAuth struct{ srv *api.Server }

func (p *phoneAuth) Authenticate(token string) (broker.PhoneSession, error) {
	if p.srv == nil {
		return nil, errors.New("edge: API not started")
	}
	s, err := p.srv.VerifyPhone(token)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// teeDownlink publishes the edge's own messages (desired state, alerts)
// through the external broker to devices and through the phones' broker
// to phones.
type teeDownlink struct {
	ext    api.Downlink
	phones *broker.Broker
}

func (t teeDownlink) Publish(topic string, payload []byte, retain bool, qos byte) error {
	if err := t.ext.Publish(topic, payload, retain, qos); err != nil {
		return err
	}
	// Best effort: phones are told what the devices were told.
	_ = t.phones.Publish(topic, payload, retain, qos)
	return nil
}
