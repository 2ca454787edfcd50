package broker

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Phones (README "Live feed", docs/security.md) are MQTT clients that reach
// the broker over WebSocket on the HTTP port (pkg/api serves /mqtt and hands
// the byte stream to ServePhone). They authenticate with an access token as
// the password, may subscribe at QoS 0 or 1 to exactly
// sensors/{device}/telemetry, sensors/{device}/state,
// devices/{device}/desired and alerts/{device} for the devices the policy
// lets them read, and publish nothing. They get sensors/ topics from the
// fan-out's live mirror (fanout.go), at most once per topic and
// Config.LiveInterval: their subscriptions to them are held under
// livePrefix, and each delivery's topic is given back. Decisions are cached per session and
// re-evaluated on RecheckPhones and every PhoneRecheck; a subscription the
// user lost is dropped, and the session is closed when its token expires or
// its session is revoked.

// PhoneAuth verifies phones' tokens; pkg/api implements it with the same
// verification and policy as HTTP.
type PhoneAuth interface {
	// Authenticate verifies an access token and returns its session.
	Authenticate(token string) (PhoneSession, error)
}

// PhoneSession is one verified access token.
type PhoneSession interface {
	OpenID() string
	ExpiresAt() time.Time
	// Revoked reports whether the token's session was revoked since.
	Revoked() bool
	// MayRead decides action device.read on device by policy, with the
	// user's current roles.
	MayRead(ctx context.Context, device string) (bool, error)
}

// phoneListener is the mochi listener id of phone connections; it is how
// every hook tells a phone from a device.
const phoneListener = "ws-phone"

// errTokenExpired and errSessionRevoked end a phone's connection.
var (
	errTokenExpired   = errors.New("mqtt: access token expired")
	errSessionRevoked = errors.New("mqtt: session revoked")
)

func isPhone(cl *mqtt.Client) bool { return cl.Net.Listener == phoneListener }

// phoneTopic returns the device a phone may ask for with filter, or "" if
// the filter is not one of the four per-device topics (wildcards included).
func phoneTopic(filter string) string {
	// It runs for every message routed to a phone: no allocation.
	if strings.ContainsAny(filter, "+#") {
		return ""
	}
	kind, rest, _ := strings.Cut(filter, "/")
	dev, leaf, nested := strings.Cut(rest, "/")
	switch {
	case kind == "sensors" && nested && (leaf == "telemetry" || leaf == "state"):
	case kind == "devices" && nested && leaf == "desired":
	case kind == "alerts" && !nested:
	default:
		return ""
	}
	return dev
}

// phoneHook authenticates phones and is their ACL. Every method returns
// false for clients that are not phones, so the device hook decides those
// (mochi allows a connect or an ACL check if any hook allows it).
type phoneHook struct {
	mqtt.HookBase
	srv  *mqtt.Server
	auth PhoneAuth
	met  *metrics
	log  *slog.Logger
	ctx  context.Context
	// stamps are the fan-out's commit times of live messages (set
	// before the broker starts).
	stamps *liveStamps

	mu       sync.RWMutex // read-locked for each message routed to a phone
	sessions map[*mqtt.Client]*phoneSess

	targets []liveTarget // writeLive's scratch space (the fan-out goroutine's)
}

// phoneSess is one phone's verified token and its cached decisions.
type phoneSess struct {
	s     PhoneSession
	timer *time.Timer
	mu    sync.Mutex
	read  map[string]bool // device → may read, until the next recheck
	gen   uint64          // bumped by each recheck: a decision begun before one is not cached
	phoneLive
}

func (h *phoneHook) ID() string { return "outpost-phone" }

func (h *phoneHook) Provides(b byte) bool {
	switch b {
	case mqtt.OnConnectAuthenticate, mqtt.OnACLCheck, mqtt.OnSessionEstablished, mqtt.OnDisconnect, mqtt.OnPacketRead,
		mqtt.OnSubscribe, mqtt.OnUnsubscribe, mqtt.OnPacketEncode, mqtt.OnPacketSent:
		return true
	}
	return false
}

// any reports whether a phone is connected (the fan-out mirrors live
// messages only then).
func (h *phoneHook) any() bool {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return len(h.sessions) > 0
}

// liveFilter is the filter a phone's (un)subscription to filter is held
// under: sensors/ topics, at the fan-out's rate, on the live mirror
// (fanout.go). A filter already on the mirror moves further down, where
// nothing is published and the ACL refuses it.
func liveFilter(filter string) string {
	if strings.HasPrefix(filter, "sensors/") || strings.HasPrefix(filter, livePrefix) {
		return livePrefix + filter
	}
	return filter
}

// phoneACLTopic is the device a phone may read topic (a subscription as
// liveFilter holds it, or a delivered message's topic) of, or "": phones
// read sensors/ topics only on the live mirror.
func phoneACLTopic(topic string) string {
	if rest, ok := strings.CutPrefix(topic, livePrefix); ok {
		if !strings.HasPrefix(rest, "sensors/") {
			return ""
		}
		return phoneTopic(rest)
	}
	if strings.HasPrefix(topic, "sensors/") {
		return ""
	}
	return phoneTopic(topic)
}

// OnPacketEncode gives phones their messages from the live mirror under
// the topic they subscribed to.
func (h *phoneHook) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type == packets.Publish && isPhone(cl) {
		pk.TopicName = strings.TrimPrefix(pk.TopicName, livePrefix)
	}
	return pk
}

// OnPacketSent observes a live message's latency from its commit to its
// write to a phone's WebSocket. A delivery with the retain flag set is not
// observed: it is mostly a retained message a subscription brings, not a
// live one (an MQTT 5 phone's retain-as-published deliveries go unseen too).
func (h *phoneHook) OnPacketSent(cl *mqtt.Client, pk packets.Packet, _ []byte) {
	if pk.FixedHeader.Type != packets.Publish || pk.FixedHeader.Retain || !isPhone(cl) {
		return
	}
	h.observeDelivery(h.stamps.at(pk.TopicName))
}

// OnUnsubscribe unsubscribes phones from where OnSubscribe subscribed them.
func (h *phoneHook) OnUnsubscribe(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if isPhone(cl) {
		for i := range pk.Filters {
			pk.Filters[i].Filter = liveFilter(pk.Filters[i].Filter)
		}
	}
	return pk
}

func (h *phoneHook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	if !isPhone(cl) {
		return false
	}
	s, err := h.auth.Authenticate(string(pk.Connect.Password))
	if err != nil {
		h.log.Debug("phone refused", "remote", cl.Net.Remote, "err", err)
		return false
	}
	if pk.Connect.WillFlag {
		return false // a Will is a publish, and phones publish nothing
	}
	// Phone sessions live as long as the connection, under ids no device
	// can take (device client ids are [A-Za-z0-9._-] with an optional
	// ':' suffix): a phone can neither take over a device's session nor
	// leave state behind.
	cl.ID = "$phone/" + s.OpenID() + "/" + cl.ID
	cl.Properties.Clean = true
	cl.Properties.Props.SessionExpiryInterval = 0
	cl.Properties.Props.SessionExpiryIntervalFlag = false
	ps := &phoneSess{s: s, read: map[string]bool{}, phoneLive: phoneLive{live: liveConnOf(cl)}}
	h.mu.Lock()
	h.sessions[cl] = ps
	h.mu.Unlock()
	return true
}

func (h *phoneHook) OnSessionEstablished(cl *mqtt.Client, _ packets.Packet) {
	if !isPhone(cl) {
		return
	}
	h.mu.RLock()
	ps := h.sessions[cl]
	h.mu.RUnlock()
	if ps == nil {
		return
	}
	h.met.phones.Inc()
	ps.mu.Lock()
	ps.timer = time.AfterFunc(time.Until(ps.s.ExpiresAt()), func() { h.end(cl, errTokenExpired) })
	ps.mu.Unlock()
}

func (h *phoneHook) OnDisconnect(cl *mqtt.Client, _ error, _ bool) {
	if !isPhone(cl) {
		return
	}
	h.mu.Lock()
	ps := h.sessions[cl]
	delete(h.sessions, cl)
	h.mu.Unlock()
	if ps != nil {
		ps.mu.Lock()
		if ps.timer != nil {
			ps.timer.Stop()
			h.met.phones.Dec()
		}
		ps.mu.Unlock()
	}
}

// OnPacketRead ends a phone that publishes: phones write through the HTTP
// API, whose policy decides each write.
func (h *phoneHook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if isPhone(cl) && pk.FixedHeader.Type == packets.Publish {
		h.log.Debug("phone published; disconnecting", "client", cl.ID, "topic", pk.TopicName)
		h.met.phoneEnds.WithLabelValues("published").Inc()
		_ = h.srv.DisconnectClient(cl, packets.ErrNotAuthorized)
		return pk, packets.ErrRejectPacket // ends the connection
	}
	return pk, nil
}

// OnSubscribe grants phones at most QoS 1 (the live feed is a view, and
// QoS 2's extra round trip buys a phone nothing) and subscribes them to
// sensors/ topics on the live mirror (liveFilter).
func (h *phoneHook) OnSubscribe(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if isPhone(cl) {
		for i := range pk.Filters {
			pk.Filters[i].Qos = min(pk.Filters[i].Qos, 1)
			pk.Filters[i].Filter = liveFilter(pk.Filters[i].Filter)
		}
	}
	return pk
}

func (h *phoneHook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if !isPhone(cl) || write {
		return false
	}
	h.mu.RLock()
	ps := h.sessions[cl]
	h.mu.RUnlock()
	if ps == nil {
		return false
	}
	dev := phoneACLTopic(topic)
	if dev == "" {
		return false
	}
	return h.mayRead(ps, dev)
}

// mayRead answers from the session's cache, asking the policy on a miss;
// an error is a denial.
func (h *phoneHook) mayRead(ps *phoneSess, dev string) bool {
	ps.mu.Lock()
	ok, hit := ps.read[dev]
	gen := ps.gen
	ps.mu.Unlock()
	if hit {
		return ok
	}
	ok, err := ps.s.MayRead(h.ctx, dev)
	if err != nil {
		h.log.Warn("phone subscription decision failed; denied", "openid", ps.s.OpenID(), "device", dev, "err", err)
		return false
	}
	ps.mu.Lock()
	if ps.gen == gen {
		ps.read[dev] = ok
	}
	ps.mu.Unlock()
	return ok
}

// end disconnects a phone (MQTT 5: DISCONNECT "not authorized").
func (h *phoneHook) end(cl *mqtt.Client, why error) {
	h.log.Debug("closing phone session", "client", cl.ID, "reason", why)
	label := "expired"
	if errors.Is(why, errSessionRevoked) {
		label = "revoked"
	}
	h.met.phoneEnds.WithLabelValues(label).Inc()
	_ = h.srv.DisconnectClient(cl, packets.ErrNotAuthorized)
	cl.Stop(why)
}

// recheck drops every cached decision, closes sessions whose token expired
// or was revoked, and unsubscribes filters their users may no longer read.
func (h *phoneHook) recheck() {
	h.mu.Lock()
	all := make(map[*mqtt.Client]*phoneSess, len(h.sessions))
	for cl, ps := range h.sessions {
		ps.mu.Lock() // lock order: h.mu, then ps.mu
		unestablished := ps.timer == nil
		ps.mu.Unlock()
		if cl.Closed() && unestablished {
			// Authenticated, then lost before the session was
			// established (mochi calls no OnDisconnect then).
			delete(h.sessions, cl)
			continue
		}
		all[cl] = ps
	}
	h.mu.Unlock()
	now := time.Now()
	for cl, ps := range all {
		if ps.s.Revoked() {
			h.end(cl, errSessionRevoked)
			continue
		}
		if !now.Before(ps.s.ExpiresAt()) {
			h.end(cl, errTokenExpired)
			continue
		}
		ps.mu.Lock()
		ps.read = map[string]bool{}
		ps.gen++
		ps.mu.Unlock()
		for filter := range cl.State.Subscriptions.GetAll() {
			if dev := phoneACLTopic(filter); dev != "" && h.mayRead(ps, dev) {
				continue
			}
			cl.State.Subscriptions.Delete(filter)
			if h.srv.Topics.Unsubscribe(filter, cl.ID) {
				h.met.phoneEnds.WithLabelValues("access_lost").Inc()
				h.log.Info("phone lost access; unsubscribed", "openid", ps.s.OpenID(), "filter", filter)
			}
		}
	}
}

// run rechecks every interval and on every signal until ctx ends.
func (h *phoneHook) run(ctx context.Context, every time.Duration, signal <-chan struct{}) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-signal:
		}
		h.recheck()
	}
}

// phoneListenerStub registers phoneListener with mochi, so that Close
// disconnects phones as it does devices; connections arrive through
// ServePhone, not an accept loop.
type phoneListenerStub struct {
	done         chan struct{}
	closeOnce    sync.Once
	closeClients func(listener string) // Broker.closeListenerClients
}

func (l *phoneListenerStub) ID() string                  { return phoneListener }
func (l *phoneListenerStub) Address() string             { return "/mqtt" }
func (l *phoneListenerStub) Protocol() string            { return "ws" }
func (l *phoneListenerStub) Init(*slog.Logger) error     { return nil }
func (l *phoneListenerStub) Serve(listeners.EstablishFn) { <-l.done }

// Close ignores mochi's CloseFn for the broker's own (closeClients).
func (l *phoneListenerStub) Close(listeners.CloseFn) {
	l.closeOnce.Do(func() {
		close(l.done)
		l.closeClients(phoneListener)
	})
}

// ErrNoPhones: the broker was built without Config.Phones.
var ErrNoPhones = errors.New("broker: phone sessions are not enabled")

// seedLive makes the live mirror's retained messages the broker's, as
// the state file left them: each retained sensors/ message has its twin
// (a state file of an older edge has none; a crash between the two
// publishes leaves them apart), and a twin without one is cleared.
func (b *Broker) seedLive() {
	all := b.srv.Topics.Retained.GetAll()
	for topic, pk := range all {
		var err error
		if twin, ok := strings.CutPrefix(topic, livePrefix); ok {
			if _, ok := all[twin]; !ok {
				err = b.srv.Publish(topic, nil, true, 0)
			}
		} else if strings.HasPrefix(topic, "sensors/") {
			if m, ok := all[livePrefix+topic]; !ok || !bytes.Equal(m.Payload, pk.Payload) {
				err = b.srv.Publish(livePrefix+topic, pk.Payload, true, pk.FixedHeader.Qos)
			}
		}
		if err != nil {
			b.log.Warn("live feed: mirroring a retained message failed", "topic", topic, "err", err)
		}
	}
}

// ServePhone runs one phone's MQTT session over c, the byte stream of a
// WebSocket (pkg/api's /mqtt), until it ends. The first packet must be a
// CONNECT of at most MaxConnectBytes, within ConnectTimeout. If c is a
// LiveConn, the fan-out writes live messages to it directly (livewrite.go).
func (b *Broker) ServePhone(c net.Conn) error {
	if b.phones == nil {
		_ = c.Close()
		return ErrNoPhones
	}
	_ = c.SetDeadline(time.Now().Add(b.cfg.ConnectTimeout))
	if err := b.srv.EstablishConnection(phoneListener, &guardConn{Conn: c, max: b.cfg.MaxConnectBytes}); err != nil {
		return fmt.Errorf("phone session: %w", err)
	}
	return nil
}

// RecheckPhones re-evaluates every phone's subscriptions and session soon
// (roles, ownership or policies changed); it never blocks.
func (b *Broker) RecheckPhones() {
	if b.phones == nil {
		return
	}
	select {
	case b.recheck <- struct{}{}:
	default: // one is already pending
	}
}
