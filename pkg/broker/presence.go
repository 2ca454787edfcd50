package broker

import (
	"strings"
	"sync"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// presence tracks which devices hold a connection, from mochi's session
// events: a connection counts from OnSessionEstablished (authenticated,
// CONNACK sent) to its OnDisconnect, which mochi calls once per
// established connection whatever ends it (DISCONNECT, a network error, a
// missed keepalive, a session taken over, shutdown); a Will is sent only on
// such a disconnect. Connections are kept per client, not counted, so an
// overlap (a device reconnecting before its old connection is noticed
// dead, or two client ids "dev:a" and "dev:b") stays online until the last
// one goes, and a repeated disconnect event changes nothing.
type presence struct {
	mqtt.HookBase
	service map[string]string // service users are not devices

	mu    sync.Mutex
	conns map[string]map[*mqtt.Client]struct{} // device -> its connections
}

func newPresence(service map[string]string) *presence {
	return &presence{service: service, conns: map[string]map[*mqtt.Client]struct{}{}}
}

func (p *presence) ID() string { return "outpost-presence" }

func (p *presence) Provides(b byte) bool {
	return b == mqtt.OnSessionEstablished || b == mqtt.OnDisconnect
}

// device is the device a client is: its username (with credentials, the
// device id), or else its client id up to a ':' (the same rule authHook
// holds authenticated clients to). "" for the edge's own inline client and
// service users.
func (p *presence) device(cl *mqtt.Client) string {
	if cl.Net.Inline || isPhone(cl) {
		return ""
	}
	if user := string(cl.Properties.Username); user != "" {
		if _, svc := p.service[user]; svc {
			return ""
		}
		return user
	}
	id, _, _ := strings.Cut(cl.ID, ":")
	return id
}

func (p *presence) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	dev := p.device(cl)
	if dev == "" {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	set := p.conns[dev]
	if set == nil {
		set = map[*mqtt.Client]struct{}{}
		p.conns[dev] = set
	}
	set[cl] = struct{}{}
}

func (p *presence) OnDisconnect(cl *mqtt.Client, _ error, _ bool) {
	dev := p.device(cl)
	if dev == "" {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	set := p.conns[dev]
	delete(set, cl)
	if len(set) == 0 {
		delete(p.conns, dev)
	}
}

func (p *presence) online(device string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns[device]) > 0
}

// Online reports whether device holds a connection to this broker now
// (see presence). The edge's API shows it as a device's "online".
func (b *Broker) Online(device string) bool { return b.pres.online(device) }
