package broker

import (
	"bytes"
	"errors"
	"net"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// Direct live writes. A live message (non-retained, on the mirror) whose
// every subscriber is a phone granted QoS 0 on a connection that can take
// it (LiveConn) is encoded once per protocol version and written to each
// phone's WebSocket by the fan-out goroutine itself, instead of through
// mochi: mochi copies the packet for each subscriber, queues it, and wakes
// that phone's write goroutine, which encodes it again. With 1,000 phones
// on 100 busy devices that was a burst of up to a hundred goroutines made
// runnable at each pass of the live feed, queued in front of the ingest
// writer's and the devices' goroutines, and a quarter of what a delivery
// cost the edge besides the socket write itself.
//
// A write is tried only when the phone's connection has no other write
// under way (a SUBACK, a PINGRESP, a QoS 1 or retained message from
// mochi), and is bounded by liveWriteTimeout: a phone whose socket buffer
// is full has not read its feed for a long while (the buffer holds many
// seconds of it), and is disconnected (outpost_mqtt_phone_ends_total
// {reason="slow"}) rather than let it hold up everyone's feed; its client
// reconnects. A write that finds the connection busy is left to the
// phone's own flusher (flush), which writes the latest message of each
// topic it holds as soon as the connection is free: a topic's last
// message is never lost to a busy moment, and while the flusher runs the
// phone's later messages queue behind it, so each topic's stay in order.
//
// Anything else goes through mochi as before: retained messages (mochi
// keeps them for later subscriptions), a topic with a QoS 1 subscription,
// a subscription identifier, a shared or inline subscription, or a
// connection that is not a LiveConn.

// LiveConn is a phone connection the fan-out may write live messages to
// directly (pkg/api's WebSocket).
type LiveConn interface {
	// WriteLive writes p (one MQTT packet) as one message if no other
	// write is under way, within timeout; false means it was busy and
	// nothing was written. After an error the stream may hold half a
	// message.
	WriteLive(p []byte, timeout time.Duration) (bool, error)
}

// liveWriteTimeout bounds a direct write; see above.
const liveWriteTimeout = 20 * time.Millisecond

// errPhoneSlow ends a phone that does not read its live feed.
var errPhoneSlow = errors.New("mqtt: phone does not read its live feed (socket buffer full)")

// liveTarget is one phone a direct write goes to.
type liveTarget struct {
	cl *mqtt.Client
	ps *phoneSess
}

// liveConnOf is the LiveConn under a phone's connection (ServePhone wraps
// it in a guardConn), or nil.
func liveConnOf(cl *mqtt.Client) LiveConn {
	g, ok := cl.Net.Conn.(*guardConn)
	if !ok {
		return nil
	}
	lc, _ := g.Conn.(LiveConn)
	return lc
}

// hasIdentifier: the subscription has an MQTT 5 subscription identifier,
// which its messages must carry (mochi keeps a 0 per filter for those
// without).
func hasIdentifier(sub packets.Subscription) bool {
	if sub.Identifier > 0 {
		return true
	}
	for _, id := range sub.Identifiers {
		if id > 0 {
			return true
		}
	}
	return false
}

// writeLive writes a live message of topic (not retained, published at
// qos) straight to its phones and reports whether it did; false leaves
// it to mochi. at is the message's commit (Unix ns), for
// outpost_mqtt_live_delivery_duration_seconds. It is the fan-out
// goroutine's (h.targets is its scratch space).
func (h *phoneHook) writeLive(topic string, payload []byte, qos byte, at int64) bool {
	subs := h.srv.Topics.Subscribers(livePrefix + topic)
	if len(subs.Shared) > 0 || len(subs.InlineSubscriptions) > 0 {
		return false
	}
	targets := h.targets[:0]
	defer func() { clear(targets); h.targets = targets[:0] }()
	h.mu.RLock()
	for id, sub := range subs.Subscriptions {
		cl, ok := h.srv.Clients.Get(id)
		if !ok || cl.Closed() {
			continue // gone, or going
		}
		ps := h.sessions[cl] // phones only
		if ps == nil || ps.live == nil || min(sub.Qos, qos) > 0 || hasIdentifier(sub) {
			h.mu.RUnlock()
			return false
		}
		targets = append(targets, liveTarget{cl, ps})
	}
	h.mu.RUnlock()
	dev := phoneTopic(topic)
	var enc [6][]byte // by protocol version (3, 4, 5)
	for _, t := range targets {
		if !h.mayRead(t.ps, dev) {
			continue // as mochi's ACL check would: not this phone's to read
		}
		v := t.cl.Properties.ProtocolVersion
		if int(v) >= len(enc) {
			continue
		}
		if enc[v] == nil {
			pk := packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Publish}, ProtocolVersion: v, TopicName: topic, Payload: payload}
			var buf bytes.Buffer
			if err := pk.PublishEncode(&buf); err != nil {
				h.log.Debug("live feed: encoding failed", "topic", topic, "err", err)
				return true
			}
			enc[v] = buf.Bytes()
		}
		b := enc[v]
		if limit := t.cl.Properties.Props.MaximumPacketSize; limit > 0 && uint32(len(b)) > limit {
			continue // [MQTT-3.1.2-24], as mochi drops it
		}
		h.deliver(t, topic, b, at)
	}
	return true
}

// deliver writes b to one phone now, or has its flusher write it.
func (h *phoneHook) deliver(t liveTarget, topic string, b []byte, at int64) {
	ps := t.ps
	ps.lmu.Lock()
	if ps.flushing {
		ps.later[topic] = b // behind what the flusher holds: in order, the latest of each topic
		ps.lmu.Unlock()
		return
	}
	ok, err := ps.live.WriteLive(b, liveWriteTimeout)
	if ok && err == nil {
		ps.lmu.Unlock()
		h.observeDelivery(at)
		return
	}
	if !ok {
		if ps.later == nil {
			ps.later = map[string][]byte{}
		}
		ps.later[topic] = b
		ps.flushing = true
		ps.lmu.Unlock()
		go h.flush(t)
		return
	}
	ps.lmu.Unlock()
	if !errors.Is(err, net.ErrClosed) && !t.cl.Closed() {
		h.log.Debug("phone's live feed write failed; disconnecting", "client", t.cl.ID, "err", err)
		h.met.phoneEnds.WithLabelValues("slow").Inc()
		t.cl.Stop(errPhoneSlow)
	}
}

// flush is a phone's flusher: it writes what deliver left it, through
// the connection's ordinary (waiting) write, until nothing is left or a
// write fails (a closed connection fails at once). There is at most one
// per phone, and it ends by itself.
func (h *phoneHook) flush(t liveTarget) {
	ps := t.ps
	for {
		ps.lmu.Lock()
		var topic string
		var b []byte
		for k, v := range ps.later {
			topic, b = k, v
			break
		}
		if b == nil {
			ps.flushing = false
			ps.lmu.Unlock()
			return
		}
		delete(ps.later, topic)
		ps.lmu.Unlock()
		if _, err := t.cl.Net.Conn.Write(b); err != nil {
			ps.lmu.Lock()
			clear(ps.later)
			ps.flushing = false
			ps.lmu.Unlock()
			t.cl.Stop(err)
			return
		}
		h.observeDelivery(h.stamps.at(topic))
	}
}

// observeDelivery observes outpost_mqtt_live_delivery_duration_seconds
// of a live message committed at at (Unix ns; 0: unknown).
func (h *phoneHook) observeDelivery(at int64) {
	if at != 0 {
		h.met.liveDelivery.Observe(time.Duration(time.Now().UnixNano() - at).Seconds())
	}
}

// phoneLive is the part of a phone's session direct live writes keep.
type phoneLive struct {
	live     LiveConn // nil: mochi writes all of the phone's messages
	lmu      sync.Mutex
	later    map[string][]byte // topic → the latest message the flusher is to write
	flushing bool              // a flusher runs
}
