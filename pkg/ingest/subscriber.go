package ingest

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
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
	Logger   *slog.Logger
}

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
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { s.handle(s.ctx, m) }).
		SetOnConnectHandler(func(c paho.Client) {
			filters := make(map[string]byte, len(s.cfg.Topics))
			for _, t := range s.cfg.Topics {
				filters[t] = 1
			}
			tok := c.SubscribeMultiple(filters, func(_ paho.Client, m paho.Message) { s.handle(s.ctx, m) })
			if tok.WaitTimeout(10*time.Second) && tok.Error() == nil {
				s.log.Info("subscribed to external broker", "broker", s.cfg.BrokerURL, "topics", s.cfg.Topics)
				return
			}
			s.log.Error("subscribe failed; reconnecting", "broker", s.cfg.BrokerURL, "err", tok.Error())
			go c.Disconnect(0) // auto-reconnect retries the subscription
		}).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			s.log.Warn("lost external broker; reconnecting with backoff", "broker", s.cfg.BrokerURL, "err", err)
		})
}

func (s *Subscriber) handle(ctx context.Context, m paho.Message) {
	err := s.w.Submit(ctx, &Message{
		Topic:    m.Topic(),
		Payload:  m.Payload(),
		Received: time.Now(),
		Done: func(err error) {
			if err == nil {
				m.Ack()
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
