// Package broker embeds an MQTT broker (mochi-mqtt) in the edge so that a
// single binary is a working gateway. Device telemetry is handed to the
// ingest writer inside the broker and acknowledged to the device only once it
// is durable in the store; sessions, subscriptions, retained messages and
// outbound in-flight messages persist in a bbolt file so that a restart loses
// nothing the broker acknowledged.
//
// Access (README "MQTT contract", docs/security.md): with device
// credentials configured, each device may publish only below
// sensors/{its id}/ and subscribe only below devices/{its id}/ and to
// alerts/{its id}; a Will is held to the publish ACL and never retained.
// Without credentials the broker is open, to anyone only with
// AllowAnonymous, else to loopback clients only. Only the edge itself
// publishes below devices/ and alerts/, and it restores a retained
// downlink anyone else changed. Before a client has authenticated the
// broker reads at most MaxConnectBytes, waits at most ConnectTimeout, and
// throttles failed logins; connections are capped and accept errors never
// stop it. Online reports which devices hold a connection (presence.go),
// for the API's "online".
//
// Stored sensors/ messages are routed on to subscribers after the commit,
// off the acknowledgement path (fanout.go). Phones hold MQTT sessions over
// WebSocket through ServePhone, authenticated by access token and confined
// by policy to the devices they may read (phone.go), and get sensors/
// topics through a mirror the fan-out feeds at a rate of their own
// (Config.LiveInterval); with an external broker the edge runs a Broker
// with no TCP listener for them only.
package broker

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/storage"
	"github.com/mochi-mqtt/server/v2/hooks/storage/bolt"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"
	bbolt "go.etcd.io/bbolt"

	"github.com/outpost-edge/outpost/pkg/ingest"
	"github.com/outpost-edge/outpost/pkg/netlimit"
)

// Submitter takes device messages for durable ingest.
type Submitter interface {
	Submit(ctx context.Context, m *ingest.Message) error
}

// Config configures the embedded broker. DefaultConfig holds the defaults;
// New fills zero limits from it.
type Config struct {
	Listen string // TCP address, e.g. ":1883"; "" serves phones only (external-broker mode)
	// StatePath is the bbolt file for sessions, subscriptions, retained and
	// in-flight messages.
	StatePath string
	// Credentials maps device id to a bcrypt hash of its password. Empty
	// means an open broker: see AllowAnonymous.
	Credentials map[string]string
	// ServiceUsers may connect with these username/bcrypt pairs and are
	// confined only by the rule that nobody but the edge publishes below
	// devices/ and alerts/ (monitoring, bridges).
	ServiceUsers map[string]string
	// AllowAnonymous opens a broker without credentials to every address;
	// without it, such a broker accepts loopback clients only. It has no
	// effect when credentials are configured.
	AllowAnonymous bool
	// ConnectTimeout bounds the time from accept to a complete CONNECT.
	ConnectTimeout time.Duration
	// MaxConnections caps open connections, authenticated or not.
	MaxConnections int
	// MaxConnectBytes caps the first packet (CONNECT), read before the
	// client has authenticated; MaxPacketBytes caps every packet after.
	MaxConnectBytes int
	MaxPacketBytes  int
	// Login bounds the cost of failed logins.
	Login LoginLimits
	// Downlinks, when set, is the edge's desired state: the broker
	// restores retained downlinks that differ from it (at start, and when
	// anyone but the edge changes one).
	Downlinks Downlinks
	// Phones, when set, lets phones hold MQTT sessions over WebSocket
	// (ServePhone, phone.go); PhoneRecheck is how often their sessions and
	// cached subscription decisions are re-evaluated besides
	// RecheckPhones.
	Phones       PhoneAuth
	PhoneRecheck time.Duration
	// FanoutQueue bounds the stored messages waiting to be routed to
	// subscribers (fanout.go); beyond it they are dropped and counted.
	FanoutQueue int
	// LiveInterval is the phones' rate (README "Live feed"): each gets a
	// sensors/ topic's messages at most once per interval, the latest of
	// those in between (fanout.go's liveFeed). TCP subscribers get every
	// message.
	LiveInterval time.Duration
	// MaxPendingWrites is each client's queue of packets waiting to be
	// written (mochi's MaximumClientWritesPending); a packet routed to a
	// client whose queue is full is dropped for it. mochi allocates the
	// queue whole at connect: with its default of 8,192 that was 64 KiB
	// per connection, phone or device.
	MaxPendingWrites int
	// Registerer receives the broker's metrics; nil keeps them unregistered.
	Registerer prometheus.Registerer
	Logger     *slog.Logger

	// fanoutVia, in tests, is what the fan-out routes through instead of
	// mochi (to stall it).
	fanoutVia publisher
}

// DefaultConfig is the broker's limits with nothing configured. The packet
// cap after authentication is the ingest payload limit plus room for the
// topic and MQTT 5 properties.
func DefaultConfig() Config {
	return Config{
		Listen:          ":1883",
		ConnectTimeout:  5 * time.Second,
		MaxConnections:  4096,
		MaxConnectBytes: 8 << 10,
		MaxPacketBytes:  ingest.DefaultLimits.MaxPayload + 16<<10,
		Login:           DefaultLoginLimits(),
		PhoneRecheck:    10 * time.Second,
		FanoutQueue:     1 << 14,
		// Five updates a second is a live chart on a phone. It bounds
		// what phones cost: each delivery is ~20 µs of CPU (mochi, a
		// WebSocket write, the phone's read), and unbounded 1,000 phones
		// on 100 devices publishing at full rate took half of a 2-core
		// edge; at 5 a second they take ~5% (10/s: ~10%, which is all
		// the live feed may cost ingest).
		LiveInterval: 200 * time.Millisecond,
		// A fan-out round queues at most two messages per topic to a
		// subscriber (and a phone reads at most four topics), so 1,024
		// holds a full round for a dashboard of 512 publishing devices
		// (8 KiB a connection).
		MaxPendingWrites: 1024,
	}
}

// Broker is the embedded MQTT broker.
type Broker struct {
	cfg     Config
	srv     *mqtt.Server
	log     *slog.Logger
	met     *metrics
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	addr    string
	acks    *acker
	rest    *restorer // nil without Config.Downlinks
	auth    *authHook
	pres    *presence
	fan     *fanout
	phones  *phoneHook // nil without Config.Phones
	recheck chan struct{}

	closeOnce sync.Once
	closeErr  error
}

// New builds a broker that hands sensors/ messages to sub. It listens only
// after Start.
func New(cfg Config, sub Submitter) (*Broker, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	def := DefaultConfig()
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = def.ConnectTimeout
	}
	if cfg.MaxConnections <= 0 {
		cfg.MaxConnections = def.MaxConnections
	}
	if cfg.MaxConnectBytes <= 0 {
		cfg.MaxConnectBytes = def.MaxConnectBytes
	}
	if cfg.MaxPacketBytes <= 0 {
		cfg.MaxPacketBytes = def.MaxPacketBytes
	}
	if cfg.PhoneRecheck <= 0 {
		cfg.PhoneRecheck = def.PhoneRecheck
	}
	if cfg.FanoutQueue <= 0 {
		cfg.FanoutQueue = def.FanoutQueue
	}
	if cfg.LiveInterval <= 0 {
		cfg.LiveInterval = def.LiveInterval
	}
	if cfg.MaxPendingWrites <= 0 {
		cfg.MaxPendingWrites = def.MaxPendingWrites
	}
	srv := mqtt.New(&mqtt.Options{
		InlineClient: true, // for downlinks published by the edge itself
		Logger:       cfg.Logger.With("component", "mqtt"),
	})
	// Retained desired state and queued downlinks must not silently expire.
	srv.Options.Capabilities.MaximumMessageExpiryInterval = 0
	// mochi allocates a packet's announced size before reading it; the cap
	// is announced to MQTT 5 clients in CONNACK (finding 5).
	srv.Options.Capabilities.MaximumPacketSize = uint32(cfg.MaxPacketBytes)
	srv.Options.Capabilities.MaximumClientWritesPending = int32(cfg.MaxPendingWrites)
	// Acks carry no properties of the packet they acknowledge: mochi would
	// copy a publisher's user properties into its PUBACK, with the reason
	// code 0x01 (granted QoS 1), invalid in a PUBACK; paho and mqtt.js v5
	// clients break on it.
	srv.Options.Capabilities.Compatibilities.NoInheritedPropertiesOnAck = true
	ctx, cancel := context.WithCancel(context.Background())
	met := newMetrics(cfg.Registerer)
	b := &Broker{cfg: cfg, srv: srv, log: cfg.Logger, met: met, ctx: ctx, cancel: cancel}
	fail := func(err error) (*Broker, error) {
		cancel()
		return nil, err
	}

	b.auth = &authHook{creds: cfg.Credentials, service: cfg.ServiceUsers, gate: newLoginGate(cfg.Login), met: met, log: cfg.Logger}
	if err := srv.AddHook(b.auth, nil); err != nil {
		return fail(fmt.Errorf("broker auth hook: %w", err))
	}
	if cfg.Phones != nil {
		b.phones = &phoneHook{srv: srv, auth: cfg.Phones, met: met, log: cfg.Logger, ctx: ctx, sessions: map[*mqtt.Client]*phoneSess{}}
		if err := srv.AddHook(b.phones, nil); err != nil {
			return fail(fmt.Errorf("broker phone hook: %w", err))
		}
		b.recheck = make(chan struct{}, 1)
		b.wg.Add(1)
		go func() { defer b.wg.Done(); b.phones.run(ctx, cfg.PhoneRecheck, b.recheck) }()
	}
	var phonesOn func() bool
	if b.phones != nil {
		phonesOn = b.phones.any
	}
	var route publisher = srv
	if cfg.fanoutVia != nil {
		route = cfg.fanoutVia
	}
	b.fan = newFanout(route, cfg.FanoutQueue, cfg.LiveInterval, phonesOn, met, cfg.Logger)
	if b.phones != nil {
		b.phones.stamps = b.fan.live.stamps
		b.fan.direct = b.phones.writeLive
	}
	b.wg.Add(1)
	go func() { defer b.wg.Done(); b.fan.run(ctx) }()
	b.pres = newPresence(cfg.ServiceUsers)
	if err := srv.AddHook(b.pres, nil); err != nil {
		return fail(fmt.Errorf("broker presence hook: %w", err))
	}
	if cfg.StatePath != "" {
		err := srv.AddHook(&persistHook{sanitize: b.auth.sanitizeWill}, &bolt.Options{
			Path:    cfg.StatePath,
			Options: &bbolt.Options{Timeout: 2e9},
		})
		if err != nil {
			return fail(fmt.Errorf("open broker state %s: %w", cfg.StatePath, err))
		}
	}
	if cfg.Downlinks != nil {
		b.rest = newRestorer(srv, cfg.Downlinks, cfg.Logger, met)
		if err := srv.AddHook(&restoreHook{r: b.rest}, nil); err != nil {
			return fail(fmt.Errorf("broker restore hook: %w", err))
		}
	}
	if sub != nil {
		b.acks = newAcker(cfg.Logger)
		b.wg.Add(1)
		go func() { defer b.wg.Done(); b.acks.run(ctx) }()
		if err := srv.AddHook(&ingestHook{ctx: ctx, sub: sub, log: cfg.Logger, srv: srv, acks: b.acks, fan: b.fan}, nil); err != nil {
			return fail(fmt.Errorf("broker ingest hook: %w", err))
		}
	}
	return b, nil
}

// Start listens on the configured address and serves in the background.
// Retained downlinks are checked against Config.Downlinks before the first
// connection is accepted.
func (b *Broker) Start() error {
	if b.phones != nil {
		if err := b.srv.AddListener(&phoneListenerStub{done: make(chan struct{}), closeClients: b.closeListenerClients}); err != nil {
			return fmt.Errorf("mqtt phone listener: %w", err)
		}
	}
	if b.cfg.Listen == "" {
		if err := b.srv.Serve(); err != nil {
			return fmt.Errorf("mqtt serve: %w", err)
		}
		return nil
	}
	ln, err := net.Listen("tcp", b.cfg.Listen)
	if err != nil {
		return fmt.Errorf("mqtt listen %s: %w", b.cfg.Listen, err)
	}
	open := b.auth.open()
	var allow func(net.Addr) bool
	switch {
	case !open:
		if b.cfg.AllowAnonymous {
			b.log.Warn("mqtt.allow_anonymous has no effect: device credentials are configured, every client authenticates")
		}
	case b.cfg.AllowAnonymous:
		b.log.Warn("embedded MQTT broker is open (mqtt.allow_anonymous): any client may connect, publish below sensors/ and read every downlink; configure mqtt.devices for production")
	default:
		allow = netlimit.IsLoopback
		b.log.Warn("embedded MQTT broker accepts loopback clients only: no device credentials (mqtt.devices) are configured and mqtt.allow_anonymous is off", "listen", ln.Addr().String())
	}
	gate := make(chan struct{})
	defer close(gate) // after the sweep; also on failure, so Serve cannot block forever
	tcp := &tcpListener{
		id: "tcp", gate: gate, connectTimeout: b.cfg.ConnectTimeout, maxConnect: b.cfg.MaxConnectBytes, log: b.log,
		closeClients: b.closeListenerClients,
		ln: netlimit.New(ln, netlimit.Config{
			Name:        "mqtt",
			Logger:      b.log,
			MaxConns:    b.cfg.MaxConnections,
			Allow:       allow,
			AcceptError: func(error) { b.met.acceptErrors.Inc() }, // netlimit logs once per burst
			Refuse: func(_ net.Conn, reason error) {
				label := "connection_cap"
				if errors.Is(reason, netlimit.ErrRefusedRemote) {
					label = "remote"
				}
				b.met.refused.WithLabelValues(label).Inc()
			},
		}),
	}
	if err := b.srv.AddListener(tcp); err != nil {
		_ = ln.Close()
		return fmt.Errorf("mqtt listen %s: %w", b.cfg.Listen, err)
	}
	b.addr = tcp.Address()
	if err := b.srv.Serve(); err != nil {
		return fmt.Errorf("mqtt serve: %w", err)
	}
	if b.phones != nil {
		b.seedLive()
	}
	if b.rest != nil {
		// The state file is loaded: repair what it holds before a device
		// can receive it.
		if err := b.rest.sweep(); err != nil {
			b.log.Warn("checking retained downlinks at start failed", "err", err)
		}
		b.wg.Add(1)
		go func() { defer b.wg.Done(); b.rest.run(b.ctx) }()
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
//
// It is safe to call more than once: mochi's own Close panics the second
// time.
func (b *Broker) Close() error {
	b.closeOnce.Do(func() {
		b.cancel()
		b.closeErr = b.srv.Close()
		b.wg.Wait()
	})
	return b.closeErr
}

// closeListenerClients disconnects the clients of one listener when it
// closes, as mochi's own closeListenerClients does, but without
// Clients.GetByListener: that takes the clients' read lock twice (it calls
// Len under it), so a client connecting or leaving in between (Delete
// waiting for the write lock blocks the second read lock) deadlocks Close
// for good (mochi v2.7.9; seen with 1,000 phones leaving as an edge shut
// down). GetAll takes the lock once.
func (b *Broker) closeListenerClients(listener string) {
	for _, cl := range b.srv.Clients.GetAll() {
		if cl.Net.Listener == listener && !cl.Closed() {
			_ = b.srv.DisconnectClient(cl, packets.ErrServerShuttingDown)
		}
	}
}

// persistHook is mochi's bbolt storage hook minus the per-message writes for
// inbound QoS 1 acknowledgements: those messages are already durable in the
// edge store before the PUBACK, and persisting each ack would cost two fsyncs
// per message. Outbound in-flight publishes (downlinks) are still persisted;
// the hook remembers which, because inbound and outbound completions both
// arrive as PUBACK packets.
type persistHook struct {
	bolt.Hook
	// sanitize fixes a stored client's Will to today's rules: a state
	// file written by an older edge may hold retained Wills on any topic.
	sanitize func(*storage.Client)
	mu       sync.Mutex
	stored   map[string]struct{} // client id + packet id of persisted outbound messages
}

func inflightID(client string, packetID uint16) string {
	return client + ":" + strconv.Itoa(int(packetID))
}

// Phone sessions end with their connection (phone.go): nothing of them is
// persisted.

func (h *persistHook) OnSessionEstablished(cl *mqtt.Client, pk packets.Packet) {
	if !isPhone(cl) {
		h.Hook.OnSessionEstablished(cl, pk)
	}
}

func (h *persistHook) OnDisconnect(cl *mqtt.Client, err error, expire bool) {
	if !isPhone(cl) {
		h.Hook.OnDisconnect(cl, err, expire)
	}
}

func (h *persistHook) OnSubscribed(cl *mqtt.Client, pk packets.Packet, codes []byte) {
	if !isPhone(cl) {
		h.Hook.OnSubscribed(cl, pk, codes)
	}
}

func (h *persistHook) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	if !isPhone(cl) {
		h.Hook.OnUnsubscribed(cl, pk)
	}
}

func (h *persistHook) OnQosPublish(cl *mqtt.Client, pk packets.Packet, sent int64, resends int) {
	if pk.FixedHeader.Type != packets.Publish || isPhone(cl) {
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

// Provides is the bolt hook's set without the $SYS record (OnSysInfoTick,
// StoredSysInfo). mochi restores $SYS counters only with
// Compatibilities.RestoreSysInfoOnRestart, which the edge leaves off, so the
// record was written for nothing: a bbolt transaction, with its fsyncs, at
// every $SYS tick (each second). Reading it was worse than useless: on a
// state file without one (first start, or one the tick never reached)
// mochi's getKv logs ErrKeyNotFound at ERROR ("failed to get data"
// key=SYS) before StoredSysInfo forgives it.
func (h *persistHook) Provides(b byte) bool {
	if b == mqtt.OnSysInfoTick || b == mqtt.StoredSysInfo {
		return false
	}
	return h.Hook.Provides(b)
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

func (h *persistHook) StoredClients() ([]storage.Client, error) {
	cls, err := h.Hook.StoredClients()
	if h.sanitize != nil {
		for i := range cls {
			h.sanitize(&cls[i])
		}
	}
	return cls, err
}

func (h *persistHook) StoredInflightMessages() ([]storage.Message, error) {
	msgs, err := h.Hook.StoredInflightMessages()
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.stored == nil {
		h.stored = map[string]struct{}{}
	}
	for i := range msgs {
		// mochi's bolt hook keys in-flight messages "if_{client}:{packet id}"
		// but does not store PacketID; restored with id 0, every queued
		// message would collide and be resent under an invalid id.
		m := &msgs[i]
		j := strings.LastIndexByte(m.ID, ':')
		if j < 0 {
			continue
		}
		pid, perr := strconv.ParseUint(m.ID[j+1:], 10, 16)
		if perr != nil {
			continue
		}
		m.PacketID = uint16(pid)
		h.stored[inflightID(m.Client, m.PacketID)] = struct{}{}
	}
	return msgs, err
}

// ingestHook hands sensors/ publishes to the ingest writer. For QoS 1 it
// takes the PUBACK away from mochi (which would send it before returning
// from processPublish) and sends it itself once the message is durable, so a
// device can keep many publishes in flight and one group commit covers many
// messages of each device. QoS 2 keeps mochi's flow and blocks until durable,
// and mochi routes it to TCP subscribers (phones get it through the fan-out's live mirror); QoS 0 and 1 messages, which mochi no longer sees
// after the hook rejects them, are routed by the fan-out once stored, at
// their QoS and with their retain flag (fanout.go).
type ingestHook struct {
	mqtt.HookBase
	ctx  context.Context
	sub  Submitter
	log  *slog.Logger
	srv  *mqtt.Server
	acks *acker
	fan  *fanout
}

func (h *ingestHook) ID() string { return "outpost-ingest" }

func (h *ingestHook) Provides(b byte) bool { return b == mqtt.OnPublish }

func (h *ingestHook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline || !strings.HasPrefix(pk.TopicName, "sensors/") {
		return pk, nil
	}
	// No copy of the payload: mochi decodes every packet from a buffer of
	// its own (Client.ReadPacket) and never writes to it afterwards, so the
	// writer and the fan-out may keep it.
	topic, payload, retain := pk.TopicName, pk.Payload, pk.FixedHeader.Retain
	switch pk.FixedHeader.Qos {
	case 0:
		m := &ingest.Message{Topic: topic, Payload: payload, Done: func(err error) {
			if err == nil {
				h.fan.forward(topic, payload, 0, retain)
			}
		}}
		if err := h.sub.Submit(h.ctx, m); err != nil {
			h.log.Warn("QoS 0 message not stored", "client", cl.ID, "topic", topic, "err", err)
		}
		return pk, packets.ErrRejectPacket
	case 1:
		pid := pk.PacketID
		m := &ingest.Message{Topic: topic, Payload: payload, Done: func(err error) {
			if err != nil {
				h.refuse(cl, err)
				return
			}
			h.acks.ack(cl, pid)
			h.fan.forward(topic, payload, 1, retain)
		}}
		if err := h.sub.Submit(h.ctx, m); err != nil {
			return pk, h.refuse(cl, err)
		}
		// Rejecting stops mochi from acknowledging and routing now; the
		// acker sends the PUBACK after the commit.
		return pk, packets.ErrRejectPacket
	}
	done := make(chan error, 1)
	m := &ingest.Message{Topic: topic, Payload: payload, Done: func(err error) { done <- err }}
	if err := h.sub.Submit(h.ctx, m); err != nil {
		return pk, h.refuse(cl, err)
	}
	select {
	case err := <-done:
		if err != nil {
			return pk, h.refuse(cl, err)
		}
		h.fan.forwardLive(topic, payload, 2, retain) // mochi routes it to TCP subscribers
		return pk, nil
	case <-h.ctx.Done():
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

// acker writes PUBACKs for durable messages. It coalesces the acks of one
// group commit into one write per client, in the order the messages arrived
// (MQTT requires QoS 1 acks in publish order), off the writer's goroutine so
// a slow client cannot stall commits.
type acker struct {
	jobs chan ackJob
	log  *slog.Logger
}

type ackJob struct {
	cl  *mqtt.Client
	pid uint16
}

func newAcker(log *slog.Logger) *acker {
	return &acker{jobs: make(chan ackJob, 1<<16), log: log}
}

func (a *acker) ack(cl *mqtt.Client, pid uint16) { a.jobs <- ackJob{cl, pid} }

// run writes acks until ctx ends and the queue is empty.
func (a *acker) run(ctx context.Context) {
	bufs := map[*mqtt.Client][]byte{}
	var order []*mqtt.Client
	for {
		var j ackJob
		select {
		case j = <-a.jobs:
		case <-ctx.Done():
			return
		}
		for {
			b, seen := bufs[j.cl]
			if !seen {
				order = append(order, j.cl)
			}
			bufs[j.cl] = append(b, 0x40, 0x02, byte(j.pid>>8), byte(j.pid))
			select {
			case j = <-a.jobs:
				continue
			default:
			}
			break
		}
		for _, cl := range order {
			a.write(cl, bufs[cl])
			delete(bufs, cl)
		}
		order = order[:0]
	}
}

func (a *acker) write(cl *mqtt.Client, b []byte) {
	if cl.Closed() || cl.Net.Conn == nil {
		return // the device will redeliver; dedupe keeps it stored once
	}
	cl.Lock()
	_ = cl.Net.Conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, err := cl.Net.Conn.Write(b)
	_ = cl.Net.Conn.SetWriteDeadline(time.Time{})
	cl.Unlock()
	if err != nil {
		a.log.Warn("PUBACK write failed; closing client", "client", cl.ID, "err", err)
		go cl.Stop(fmt.Errorf("write puback: %w", err))
	}
}
