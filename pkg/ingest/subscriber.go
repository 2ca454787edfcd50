package ingest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/outpost-edge/outpost/pkg/wire"
)

// SubscriberConfig configures ingest from an external broker.
type SubscriberConfig struct {
	BrokerURL string // tcp://host:port
	// ClientID must be stable across restarts: the broker keeps the
	// persistent session, and with it the unacknowledged messages, by it.
	ClientID string
	Username string
	Password string
	Topics   []string // default sensors/+/telemetry and sensors/+/state
	// Downlinks, when set, is the edge's desired state: the subscriber
	// also subscribes to devices/+/desired and republishes the edge's
	// payload over a retained downlink that differs from it (forged or
	// erased through the external broker, whose ACL the edge does not
	// control), and republishes every downlink after each (re)connect,
	// which covers a broker restarted without its retained messages.
	Downlinks Downlinks
	// Committed, when set, is called with each message once the writer
	// finished with it and it was acknowledged to the broker (the edge
	// feeds its phones' fan-out from it). It runs on the writer's
	// goroutine, so it must not block.
	Committed func(topic string, payload []byte, qos byte, retain bool)
	Logger    *slog.Logger
}

// Downlinks is the edge's record of its retained desired-state downlinks
// (see SubscriberConfig.Downlinks).
type Downlinks interface {
	// Desired returns the payload the edge publishes retained on
	// devices/{device}/desired, or nil when it publishes none (then the
	// subscriber leaves the topic alone: it may be another edge's).
	Desired(device string) ([]byte, error)
	// EachDesired calls fn for every device with a downlink until fn
	// returns false.
	EachDesired(fn func(device string, payload []byte) bool) error
}

// downlinkFilter is where the edge's retained desired-state downlinks live
// (wire.DesiredTopic).
const downlinkFilter = "devices/+/desired"

// Subscriber ingests from an MQTT broker with a persistent QoS 1 session and
// manual acknowledgements: a message is PUBACKed only after the writer made
// it durable, so the broker redelivers anything the edge did not store.
type Subscriber struct {
	cfg    SubscriberConfig
	w      *Writer
	log    *slog.Logger
	client paho.Client
	// ctx bounds message handlers; Run cancels it when it stops.
	ctx    context.Context
	cancel context.CancelFunc
}

// NewSubscriber builds a subscriber feeding w.
func NewSubscriber(cfg SubscriberConfig, w *Writer) *Subscriber {
	if len(cfg.Topics) == 0 {
		cfg.Topics = []string{"sensors/+/telemetry", "sensors/+/state"}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	s := &Subscriber{cfg: cfg, w: w, log: cfg.Logger}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.client = paho.NewClient(s.options())
	return s
}

// Run connects (retrying with backoff until ctx ends), subscribes on every
// (re)connect, and ingests until ctx is cancelled; then it disconnects,
// leaving unacknowledged messages with the broker.
func (s *Subscriber) Run(ctx context.Context) error {
	defer s.cancel()
	tok := s.client.Connect()
	select {
	case <-tok.Done():
		if err := tok.Error(); err != nil {
			return fmt.Errorf("connect %s: %w", s.cfg.BrokerURL, err)
		}
	case <-ctx.Done():
	}
	<-ctx.Done()
	s.cancel()
	s.client.Disconnect(250)
	return nil
}

func (s *Subscriber) options() *paho.ClientOptions {
	return paho.NewClientOptions().
		AddBroker(s.cfg.BrokerURL).
		SetClientID(s.cfg.ClientID).
		SetUsername(s.cfg.Username).
		SetPassword(s.cfg.Password).
		SetCleanSession(false).
		SetStore(newDownlinkStore()).
		SetAutoAckDisabled(true).
		// Handlers run concurrently; acks go out in commit order, not
		// arrival order, which MQTT permits for QoS 1.
		SetOrderMatters(false).
		SetAutoReconnect(true).
		SetConnectRetry(true).
		SetConnectRetryInterval(time.Second).
		SetMaxReconnectInterval(30 * time.Second).
		SetKeepAlive(30 * time.Second).
		// A persistent session's queued messages arrive right after
		// CONNACK, possibly before the OnConnect handler has re-added the
		// subscription's route; paho would leave those unhandled and
		// unacknowledged until the next reconnect. The default handler
		// catches them.
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { s.dispatch(m) }).
		SetOnConnectHandler(func(c paho.Client) {
			filters := make(map[string]byte, len(s.cfg.Topics)+1)
			for _, t := range s.cfg.Topics {
				filters[t] = 1
			}
			if s.cfg.Downlinks != nil {
				filters[downlinkFilter] = 1
			}
			tok := c.SubscribeMultiple(filters, func(_ paho.Client, m paho.Message) { s.dispatch(m) })
			if tok.WaitTimeout(10*time.Second) && tok.Error() == nil {
				s.log.Info("subscribed to external broker", "broker", s.cfg.BrokerURL, "topics", s.cfg.Topics)
				if s.cfg.Downlinks != nil {
					go s.republishAll()
				}
				return
			}
			s.log.Error("subscribe failed; reconnecting", "broker", s.cfg.BrokerURL, "err", tok.Error())
			go c.Disconnect(0) // auto-reconnect retries the subscription
		}).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			s.log.Warn("lost external broker; reconnecting with backoff", "broker", s.cfg.BrokerURL, "err", err)
		})
}

// dispatch routes a message: downlinks are checked, the rest ingested.
func (s *Subscriber) dispatch(m paho.Message) {
	if strings.HasPrefix(m.Topic(), "devices/") {
		s.checkDownlink(m)
		return
	}
	s.handle(s.ctx, m)
}

// checkDownlink republishes the edge's desired state over a downlink that
// differs from it. The edge's own publishes come back equal and cost a
// comparison.
func (s *Subscriber) checkDownlink(m paho.Message) {
	defer m.Ack()
	rest, _ := strings.CutPrefix(m.Topic(), "devices/")
	dev, ok := strings.CutSuffix(rest, "/desired")
	if !ok || s.cfg.Downlinks == nil {
		return
	}
	want, err := s.cfg.Downlinks.Desired(dev)
	if err != nil {
		s.log.Warn("checking a retained downlink failed", "device", dev, "err", err)
		return
	}
	if want == nil || bytes.Equal(m.Payload(), want) {
		return
	}
	s.log.Warn("downlink on the external broker differs from the edge's desired state; republishing it", "device", dev)
	if err := s.Publish(m.Topic(), want, true, wire.DesiredQoS); err != nil && s.ctx.Err() == nil {
		s.log.Warn("republishing downlink failed", "device", dev, "err", err)
	}
}

// republishAll publishes every downlink the edge has, retained, after a
// (re)connect: a broker that restarted without its retained messages gets
// them back.
func (s *Subscriber) republishAll() {
	// Collected first: a bbolt read transaction must not stay open across
	// network round trips (it would hold off the writer's remap).
	type downlink struct {
		dev     string
		payload []byte
	}
	var all []downlink
	err := s.cfg.Downlinks.EachDesired(func(dev string, payload []byte) bool {
		all = append(all, downlink{dev, payload})
		return true
	})
	if err != nil {
		s.log.Warn("listing downlinks to republish failed", "err", err)
	}
	for _, d := range all {
		if s.ctx.Err() != nil {
			return
		}
		if err := s.Publish(wire.DesiredTopic(d.dev), d.payload, true, wire.DesiredQoS); err != nil {
			s.log.Warn("republishing downlinks after connect stopped", "device", d.dev, "err", err)
			return
		}
	}
	s.log.Debug("republished retained downlinks", "count", len(all))
}

func (s *Subscriber) handle(ctx context.Context, m paho.Message) {
	err := s.w.Submit(ctx, &Message{
		Topic:    m.Topic(),
		Payload:  m.Payload(),
		Received: time.Now(),
		Done: func(err error) {
			if err == nil {
				m.Ack()
				if s.cfg.Committed != nil {
					s.cfg.Committed(m.Topic(), m.Payload(), m.Qos(), m.Retained())
				}
			}
		},
	})
	if err != nil && !errors.Is(err, ErrStopped) && ctx.Err() == nil {
		s.log.Warn("message not queued; broker will redeliver", "topic", m.Topic(), "err", err)
	}
}

// Publish sends a message through the external broker, e.g. a retained
// desired-state downlink.
func (s *Subscriber) Publish(topic string, payload []byte, retain bool, qos byte) error {
	tok := s.client.Publish(topic, qos, retain, payload)
	if !tok.WaitTimeout(10 * time.Second) {
		return fmt.Errorf("publish %s: timed out", topic)
	}
	if err := tok.Error(); err != nil {
		return fmt.Errorf("publish %s: %w", topic, err)
	}
	return nil
}

// downlinkStore is the session store of the subscriber's client: paho's
// memory store without the outbound publishes (keys "o."). paho's resume
// after a (re)connect re-sends the outbound publishes it finds in the
// store, while the OnConnect handler (which republishes every downlink,
// below) is already publishing: resume then finds those new publishes too,
// marks the packets being written as duplicates and claims their ids a
// second time (a data race, and "close of closed channel" in paho). The
// edge republishes its whole desired state on every connect anyway, so an
// outbound publish needs no persisting; inbound state (QoS 1 messages
// received, awaiting their PUBACK) is kept as before.
type downlinkStore struct{ *paho.MemoryStore }

func newDownlinkStore() downlinkStore { return downlinkStore{paho.NewMemoryStore()} }

// Put keeps everything but outbound publishes.
func (s downlinkStore) Put(key string, m packets.ControlPacket) {
	if _, publish := m.(*packets.PublishPacket); publish && strings.HasPrefix(key, "o.") {
		return
	}
	s.MemoryStore.Put(key, m)
}
