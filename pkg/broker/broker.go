// Package broker embeds an MQTT broker (mochi-mqtt) in the edge so that a
// single binary is a working gateway. Device telemetry is handed to the
// ingest writer inside the broker and acknowledged to the device only once it
// is durable in the store; sessions, subscriptions, retained messages and
// outbound in-flight messages persist in a bbolt file so that a restart loses
// nothing the broker acknowledged. With device credentials configured, each
// device may publish only below sensors/{its id}/ and subscribe only below
// devices/{its id}/.
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
	"github.com/mochi-mqtt/server/v2/hooks/storage"
	"github.com/mochi-mqtt/server/v2/hooks/storage/bolt"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	bbolt "go.etcd.io/bbolt"
	"golang.org/x/crypto/bcrypt"

	"github.com/outpost-edge/outpost/pkg/ingest"
)

// Submitter takes device messages for durable ingest.
type Submitter interface {
	Submit(ctx context.Context, m *ingest.Message) error
}

// Config configures the embedded broker.
type Config struct {
	Listen string // TCP address, e.g. ":1883"
	// StatePath is the bbolt file for sessions, subscriptions, retained and
	// in-flight messages.
	StatePath string
	// Credentials maps device id to a bcrypt hash of its password. Empty
	// means an open broker (development only).
	Credentials map[string]string
	// ServiceUsers may connect with these username/bcrypt pairs and have no
	// ACL restriction (the edge's own clients, monitoring).
	ServiceUsers map[string]string
	Logger       *slog.Logger
}

// Broker is the embedded MQTT broker.
type Broker struct {
	cfg    Config
	srv    *mqtt.Server
	log    *slog.Logger
	cancel context.CancelFunc
	wg     sync.WaitGroup
	addr   string
}

// New builds a broker that hands sensors/ messages to sub. It listens only
// after Start.
func New(cfg Config, sub Submitter) (*Broker, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	srv := mqtt.New(&mqtt.Options{
		InlineClient: true, // for downlinks published by the edge itself
		Logger:       cfg.Logger.With("component", "mqtt"),
	})
	// Retained desired state and queued downlinks must not silently expire.
	srv.Options.Capabilities.MaximumMessageExpiryInterval = 0
	ctx, cancel := context.WithCancel(context.Background())
	b := &Broker{cfg: cfg, srv: srv, log: cfg.Logger, cancel: cancel}

	if err := srv.AddHook(&authHook{creds: cfg.Credentials, service: cfg.ServiceUsers, log: cfg.Logger}, nil); err != nil {
		cancel()
		return nil, fmt.Errorf("broker auth hook: %w", err)
	}
	if cfg.StatePath != "" {
		err := srv.AddHook(new(persistHook), &bolt.Options{
			Path:    cfg.StatePath,
			Options: &bbolt.Options{Timeout: 2e9},
		})
		if err != nil {
			cancel()
			return nil, fmt.Errorf("open broker state %s: %w", cfg.StatePath, err)
		}
	}
	if sub != nil {
		if err := srv.AddHook(&ingestHook{ctx: ctx, sub: sub, log: cfg.Logger}, nil); err != nil {
			cancel()
			return nil, fmt.Errorf("broker ingest hook: %w", err)
		}
	}
	return b, nil
}

// Start listens on the configured address and serves in the background.
func (b *Broker) Start() error {
	tcp := listeners.NewTCP(listeners.Config{ID: "tcp", Address: b.cfg.Listen})
	if err := b.srv.AddListener(tcp); err != nil {
		return fmt.Errorf("mqtt listen %s: %w", b.cfg.Listen, err)
	}
	b.addr = tcp.Address()
	if err := b.srv.Serve(); err != nil {
		return fmt.Errorf("mqtt serve: %w", err)
	}
	return nil
}

// Addr is the address the broker listens on, after Start.
func (b *Broker) Addr() string { return b.addr }

// Publish sends a message from the edge itself, e.g. a retained desired-state
// downlink. Retained messages persist in the broker's state file.
func (b *Broker) Publish(topic string, payload []byte, retain bool, qos byte) error {
	if err := b.srv.Publish(topic, payload, retain, qos); err != nil {
		return fmt.Errorf("publish %s: %w", topic, err)
	}
	return nil
}

// Close stops listening, disconnects clients, releases devices blocked
// waiting for ingest (their messages stay unacknowledged and will be resent),
// and closes the state file.
func (b *Broker) Close() error {
	b.cancel()
	return b.srv.Close()
}

// persistHook is mochi's bbolt storage hook minus the per-message writes for
// inbound QoS 1 acknowledgements: those messages are already durable in the
// edge store before the PUBACK, and persisting each ack would cost two fsyncs
// per message. Outbound in-flight publishes (downlinks) are still persisted;
// the hook remembers which, because inbound and outbound completions both
// arrive as PUBACK packets.
type persistHook struct {
	bolt.Hook
	mu     sync.Mutex
	stored map[string]struct{} // client id + packet id of persisted outbound messages
}

func inflightID(client string, packetID uint16) string {
	return fmt.Sprintf("%s:%d", client, packetID)
}

func (h *persistHook) OnQosPublish(cl *mqtt.Client, pk packets.Packet, sent int64, resends int) {
	if pk.FixedHeader.Type != packets.Publish {
		return
	}
	h.mu.Lock()
	if h.stored == nil {
		h.stored = map[string]struct{}{}
	}
	h.stored[inflightID(cl.ID, pk.PacketID)] = struct{}{}
	h.mu.Unlock()
	h.Hook.OnQosPublish(cl, pk, sent, resends)
}

func (h *persistHook) OnQosComplete(cl *mqtt.Client, pk packets.Packet) {
	id := inflightID(cl.ID, pk.PacketID)
	h.mu.Lock()
	_, ok := h.stored[id]
	delete(h.stored, id)
	h.mu.Unlock()
	if ok {
		h.Hook.OnQosComplete(cl, pk)
	}
}

func (h *persistHook) OnQosDropped(cl *mqtt.Client, pk packets.Packet) {
	h.OnQosComplete(cl, pk)
}

func (h *persistHook) StoredInflightMessages() ([]storage.Message, error) {
	msgs, err := h.Hook.StoredInflightMessages()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.stored == nil {
		h.stored = map[string]struct{}{}
	}
	for _, m := range msgs {
		// mochi's bolt hook keys in-flight messages "if_{client}:{packet id}"
		// but does not fill PacketID itself.
		if i := strings.LastIndexByte(m.ID, ':'); i >= 0 {
			h.stored[m.Client+m.ID[i:]] = struct{}{}
		}
	}
	return msgs, err
}

// ingestHook hands sensors/ publishes to the ingest writer and holds the
// device's PUBACK until the message is durable.
type ingestHook struct {
	mqtt.HookBase
	ctx context.Context
	sub Submitter
	log *slog.Logger
}

func (h *ingestHook) ID() string { return "outpost-ingest" }

func (h *ingestHook) Provides(b byte) bool { return b == mqtt.OnPublish }

func (h *ingestHook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline || !strings.HasPrefix(pk.TopicName, "sensors/") {
		return pk, nil
	}
	done := make(chan error, 1)
	m := &ingest.Message{
		Topic:   pk.TopicName,
		Payload: bytes.Clone(pk.Payload),
		Done:    func(err error) { done <- err },
	}
	if err := h.sub.Submit(h.ctx, m); err != nil {
		return pk, h.refuse(cl, err)
	}
	select {
	case err := <-done:
		if err != nil {
			return pk, h.refuse(cl, err)
		}
		return pk, nil
	case <-h.ctx.Done():
		// Shutting down: the writer will still finish this message, but the
		// device must not get a PUBACK we cannot vouch for.
		return pk, h.refuse(cl, h.ctx.Err())
	}
}

// refuse withholds the PUBACK and drops the connection, so the device
// redelivers the message on reconnect instead of considering it delivered.
func (h *ingestHook) refuse(cl *mqtt.Client, err error) error {
	if !errors.Is(err, context.Canceled) && !errors.Is(err, ingest.ErrStopped) {
		h.log.Warn("message not stored; disconnecting device so it redelivers", "client", cl.ID, "err", err)
	}
	go cl.Stop(fmt.Errorf("ingest: %w", err))
	return packets.ErrRejectPacket
}

// authHook authenticates devices and confines them to their own topics.
type authHook struct {
	mqtt.HookBase
	creds   map[string]string
	service map[string]string
	log     *slog.Logger
}

func (h *authHook) ID() string { return "outpost-auth" }

func (h *authHook) Provides(b byte) bool {
	return b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck
}

func (h *authHook) open() bool { return len(h.creds) == 0 && len(h.service) == 0 }

func (h *authHook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	if h.open() {
		return true
	}
	user := string(pk.Connect.Username)
	hash, ok := h.service[user]
	if !ok {
		hash, ok = h.creds[user]
	}
	if !ok || bcrypt.CompareHashAndPassword([]byte(hash), pk.Connect.Password) != nil {
		h.log.Warn("mqtt authentication failed", "username", user, "remote", cl.Net.Remote)
		return false
	}
	return true
}

func (h *authHook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if h.open() {
		return true
	}
	user := string(cl.Properties.Username)
	if _, ok := h.service[user]; ok {
		return true
	}
	if write {
		return strings.HasPrefix(topic, "sensors/"+user+"/")
	}
	return strings.HasPrefix(topic, "devices/"+user+"/")
}
