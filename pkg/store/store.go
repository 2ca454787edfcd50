// Package store is the edge's durable state in one bbolt file: per-device
// time-ordered readings with rollups for charts, the device registry with
// reported and desired state, users' roles, a bounded dead-letter log and the
// outbox of local changes waiting to be synced. Every mutation happens in one
// transaction together with its outbox entry, so what is stored and what will
// be synced never disagree. It knows nothing of MQTT, HTTP or the cloud.
package store

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/shadow"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Sentinel errors callers branch on.
var (
	ErrNotFound  = errors.New("not found")
	ErrBadCursor = errors.New("malformed cursor")
)

var (
	bucketMeta     = []byte("meta")
	bucketDevices  = []byte("devices")
	bucketSeen     = []byte("device_seen")  // device id -> last seen, Unix ms (8 bytes)
	bucketReadings = []byte("readings_v2")  // device 0 ts|hash -> value (see span)
	bucketIDs      = []byte("ids_v2")       // device 0 message id -> reading key
	bucketMinute   = []byte("rollup_1m_v2") // device 0 metric 0 start -> cell
	bucketHour     = []byte("rollup_1h_v2")
	bucketOutbox   = []byte("outbox")
	bucketDead     = []byte("dead")
	bucketUsers    = []byte("users")
	bucketStateIdx = []byte("outbox_state") // seq of each state (non-readings) outbox entry → nil
	bucketSync     = []byte("sync")         // syncer cursors and caches

	keyOutboxHead  = []byte("outbox_head")
	keyOutboxAcked = []byte("outbox_acked")
	keyHLC         = []byte("hlc")
	keyReadings    = []byte("readings_total")
	keyDevices     = []byte("devices_total")
	keyDeadNext    = []byte("dead_next")
	keyDeadCount   = []byte("dead_count")
)

const (
	minuteMs = int64(time.Minute / time.Millisecond)
	hourMs   = int64(time.Hour / time.Millisecond)
)

// Options configure a store.
type Options struct {
	// EdgeID and Region are recorded on devices first seen here.
	EdgeID string
	Region string
	// Clock stamps outbox entries and state fields; its high-water mark is
	// persisted so a restart with a clock that went backwards stays monotonic.
	Clock *hlc.Clock
	// MaxDeadLetters bounds the dead-letter log; the oldest are dropped first.
	MaxDeadLetters int
	// HoldOutboxForRules keeps outbox entries until the rule runner has
	// evaluated them (its position is SaveRuleEvents' seq), not only until
	// the cloud has acknowledged them: the runner catches up from the
	// outbox after a restart or when it falls behind.
	HoldOutboxForRules bool
	// OutboxTailBytes bounds the in-memory copy of the newest outbox
	// entries that spares Outbox a transaction and a decode when its
	// reader keeps up with the head (the rule runner, the syncer). Zero
	// takes the default (4 MiB); negative disables it.
	OutboxTailBytes int
	// NoSync disables fsync. Only for tests that prove the durability tests
	// can detect loss; never in production.
	NoSync bool
}

// Store is the edge's database. Methods are safe for concurrent use; writes
// are serialised by bbolt.
type Store struct {
	db    *bolt.DB
	path  string
	opts  Options
	clock *hlc.Clock

	// Counters mirrored from the meta bucket so that start-up and metrics
	// never scan the data.
	readings   atomic.Uint64
	devices    atomic.Uint64
	deadCount  atomic.Uint64
	outboxHead atomic.Uint64
	outboxAck  atomic.Uint64

	// devCache spares Ingest decoding the records of devices it wrote last.
	devCache deviceCache
	// tail serves Outbox reads near the head from memory.
	tail *outboxTail
	// trimPending is set when a commit carrying rule saves trimmed one
	// chunk of the outbox and more remained (OutboxTrimPending).
	trimPending atomic.Bool
	// newest spares Ingest the dedupe lookup of readings newer than any
	// stored.
	newest newestKeys
}

// DefaultOptions is the one source of the store's defaults; the edge's
// configuration builds on it.
func DefaultOptions() Options {
	return Options{MaxDeadLetters: 10000, OutboxTailBytes: defaultOutboxTailBytes}
}

// Open opens or creates the store at path. Zero options take
// DefaultOptions'.
func Open(path string, opts Options) (*Store, error) {
	if opts.Clock == nil {
		opts.Clock = hlc.NewClock(nil, 0)
	}
	if opts.MaxDeadLetters <= 0 {
		opts.MaxDeadLetters = DefaultOptions().MaxDeadLetters
	}
	if opts.OutboxTailBytes == 0 {
		opts.OutboxTailBytes = DefaultOptions().OutboxTailBytes
	}
	// NoFreelistSync, as etcd's backend does: bbolt otherwise writes the
	// whole free list, sorted, in every commit, and the edge commits
	// hundreds of times a second into a file whose trims and retention
	// leave thousands of free pages (12 % of the edge's CPU in a long run
	// with rules in force). The price is paid once per Open instead: bbolt
	// rebuilds the list by reading every page (README "Operations").
	db, err := bolt.Open(path, 0o600, &bolt.Options{
		Timeout:         2 * time.Second, // another process holds the file
		NoSync:          opts.NoSync,
		NoFreelistSync:  true,
		FreelistType:    bolt.FreelistMapType,
		InitialMmapSize: 64 << 20,
	})
	if err != nil {
		if errors.Is(err, berrors.ErrTimeout) {
			return nil, fmt.Errorf("open store %s: locked by another process", path)
		}
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	// Conversions of older releases' files, in order; each is a no-op on
	// a converted file and resumable after a crash part of the way.
	for _, migrate := range []func(*bolt.DB) error{
		func(db *bolt.DB) error { return migrateLayout(db, migrateChunk) },
		func(db *bolt.DB) error { return dropClearedIndex(db, migrateChunk) },
		migrateAlertOut,
	} {
		if err := migrate(db); err != nil {
			db.Close()
			return nil, fmt.Errorf("open store %s: %w", path, err)
		}
	}
	s := &Store{db: db, path: path, opts: opts, clock: opts.Clock, tail: newOutboxTail(opts.OutboxTailBytes)}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range [][]byte{bucketMeta, bucketDevices, bucketSeen, bucketReadings, bucketIDs, bucketMinute, bucketHour, bucketOutbox, bucketDead, bucketUsers, bucketStateIdx, bucketSync,
			bucketRules, bucketRuleState, bucketAlerts, bucketAlertIdx, bucketAlertQ} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		m := tx.Bucket(bucketMeta)
		s.readings.Store(getU64(m.Get(keyReadings)))
		s.devices.Store(getU64(m.Get(keyDevices)))
		s.deadCount.Store(getU64(m.Get(keyDeadCount)))
		s.outboxHead.Store(getU64(m.Get(keyOutboxHead)))
		s.outboxAck.Store(getU64(m.Get(keyOutboxAcked)))
		s.clock.Restore(hlc.Timestamp(getU64(m.Get(keyHLC))))
		return nil
	})
	if err != nil {
		db.Close()
		return nil, fmt.Errorf("init store %s: %w", path, err)
	}
	return s, nil
}

// Close closes the database file.
func (s *Store) Close() error {
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("close store %s: %w", s.path, err)
	}
	return nil
}

// DB exposes the bbolt handle for packages that keep their own buckets in the
// same file (refresh tokens); they must not touch the buckets named here.
func (s *Store) DB() *bolt.DB { return s.db }

// Path is the database file.
func (s *Store) Path() string { return s.path }

// Counts are cheap counters kept in the store.
type Counts struct {
	Readings      uint64
	Devices       uint64
	DeadLetters   uint64
	OutboxHead    uint64 // last sequence assigned
	OutboxAcked   uint64 // last sequence acknowledged by the cloud
	OutboxBacklog uint64
}

// Counts returns the store's counters without touching the disk.
func (s *Store) Counts() Counts {
	h, a := s.outboxHead.Load(), s.outboxAck.Load()
	return Counts{
		Readings: s.readings.Load(), Devices: s.devices.Load(), DeadLetters: s.deadCount.Load(),
		OutboxHead: h, OutboxAcked: a, OutboxBacklog: h - a,
	}
}

// Usage reports bytes in use: the pages up to the file's high-water mark
// less the free ones. bbolt never shrinks its file, so free pages are
// reusable space that the quota must not count; nor is the tail it
// preallocates beyond the high-water mark (up to 16 MiB at a time), or an
// almost empty store would look 16 MiB full and grow in jumps.
func (s *Store) Usage() (int64, error) {
	var size int64
	if err := s.db.View(func(tx *bolt.Tx) error {
		size = tx.Size()
		return nil
	}); err != nil {
		return 0, fmt.Errorf("store usage: %w", err)
	}
	st := s.db.Stats()
	free := int64(st.FreePageN+st.PendingPageN) * int64(s.db.Info().PageSize)
	return max(size-free, 0), nil
}

// FileSize is the database file's size on disk.
func (s *Store) FileSize() int64 {
	fi, err := os.Stat(s.path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// ---- device registry ----

// DeviceMeta is the administrative placement of a device. It has wire.Meta's
// fields in wire.Meta's order, so it converts to it: last-writer-wins
// compares the one canonical encoding the cloud compares.
type DeviceMeta struct {
	Owners []string      `json:"owners"`
	Region string        `json:"region"`
	Tags   wire.Tags     `json:"tags"`
	Stamp  hlc.Timestamp `json:"stamp"`
}

// Device is a registered device. LastSeen is kept apart from the rest of
// the record (bucket device_seen), as the one field every batch of
// readings changes; records written before that hold it themselves, and
// readers take the later of the two.
type Device struct {
	ID        string     `json:"id"`
	EdgeID    string     `json:"edge_id"`
	FirstSeen int64      `json:"first_seen"`
	LastSeen  int64      `json:"last_seen"`
	Meta      DeviceMeta `json:"meta"`
	Reported  shadow.Doc `json:"reported"`
	Desired   shadow.Doc `json:"desired"`
}

func getDevice(tx *bolt.Tx, id string) (*Device, error) {
	v := tx.Bucket(bucketDevices).Get([]byte(id))
	if v == nil {
		return nil, ErrNotFound
	}
	var d Device
	if err := json.Unmarshal(v, &d); err != nil {
		return nil, fmt.Errorf("decode device %s: %w", id, err)
	}
	d.LastSeen = lastSeen(tx, id, d.LastSeen)
	return &d, nil
}

// lastSeen is the later of a device record's last_seen and its last-seen
// record's.
func lastSeen(tx *bolt.Tx, id string, inRecord int64) int64 {
	return max(inRecord, int64(getU64(tx.Bucket(bucketSeen).Get([]byte(id)))))
}

func putDevice(tx *bolt.Tx, d *Device) error {
	b, err := json.Marshal(d)
	if err != nil {
		return fmt.Errorf("encode device %s: %w", d.ID, err)
	}
	return tx.Bucket(bucketDevices).Put([]byte(d.ID), b)
}

func (s *Store) newDevice(id string, now int64) *Device {
	return &Device{
		ID: id, EdgeID: s.opts.EdgeID, FirstSeen: now, LastSeen: now,
		Meta:     DeviceMeta{Region: s.opts.Region, Owners: []string{}, Tags: map[string]string{}},
		Reported: shadow.Doc{}, Desired: shadow.Doc{},
	}
}

// Device returns one device.
func (s *Store) Device(id string) (*Device, error) {
	var d *Device
	err := s.db.View(func(tx *bolt.Tx) error {
		var err error
		d, err = getDevice(tx, id)
		return err
	})
	return d, err
}

// Devices calls fn for devices in id order starting after the id after, until
// fn returns false.
func (s *Store) Devices(after string, fn func(*Device) bool) error {
	return s.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketDevices).Cursor()
		k, v := c.Seek([]byte(after))
		if k != nil && string(k) == after {
			k, v = c.Next()
		}
		for ; k != nil; k, v = c.Next() {
			var d Device
			if err := json.Unmarshal(v, &d); err != nil {
				return fmt.Errorf("decode device %s: %w", k, err)
			}
			d.LastSeen = lastSeen(tx, string(k), d.LastSeen)
			if !fn(&d) {
				return nil
			}
		}
		return nil
	})
}

// ---- outbox ----

// ChangeKind says what an outbox entry carries.
type ChangeKind uint8

// Kinds of change.
const (
	ChangeReadings ChangeKind = 1 + iota
	ChangeReported
	ChangeDesired
	ChangeMeta
	ChangeUser
)

func (k ChangeKind) String() string {
	switch k {
	case ChangeReadings:
		return "readings"
	case ChangeReported:
		return "reported"
	case ChangeDesired:
		return "desired"
	case ChangeMeta:
		return "meta"
	case ChangeUser:
		return "user"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Change is one outbox entry: a local change waiting to be synced.
type Change struct {
	Seq      uint64
	Kind     ChangeKind
	Device   string // device id, or openid for ChangeUser
	Stamp    hlc.Timestamp
	Readings []Reading
	Doc      shadow.Doc  // reported or desired delta
	Meta     *DeviceMeta // ChangeMeta
	User     *User       // ChangeUser
	// By is who made a desired, meta or user change through the API, with
	// the access token they presented: the proof the cloud verifies.
	By Actor
}

// Actor is the user behind a change and their proof: the access token
// they presented. It is kept in the outbox only until the cloud
// acknowledged the change.
type Actor struct {
	OpenID string
	Proof  string
}

// kindActor flags, on an outbox entry's kind byte, that the actor and its
// proof follow the device (entries written before actors have no flag).
const kindActor = 0x80

func encodeChange(c *Change) ([]byte, error) {
	b := make([]byte, 0, 64+len(c.By.Proof))
	if c.By != (Actor{}) {
		b = append(b, byte(c.Kind)|kindActor)
	} else {
		b = append(b, byte(c.Kind))
	}
	b = binary.BigEndian.AppendUint64(b, uint64(c.Stamp))
	b = binary.AppendUvarint(b, uint64(len(c.Device)))
	b = append(b, c.Device...)
	if c.By != (Actor{}) {
		b = binary.AppendUvarint(b, uint64(len(c.By.OpenID)))
		b = append(b, c.By.OpenID...)
		b = binary.AppendUvarint(b, uint64(len(c.By.Proof)))
		b = append(b, c.By.Proof...)
	}
	switch c.Kind {
	case ChangeReadings:
		b = binary.AppendUvarint(b, uint64(len(c.Readings)))
		for i := range c.Readings {
			r := &c.Readings[i]
			b = binary.AppendVarint(b, r.TS)
			b = binary.AppendUvarint(b, uint64(len(r.ID)))
			b = append(b, r.ID...)
			b = appendMetrics(b, r.Metrics)
		}
		return b, nil
	case ChangeReported, ChangeDesired:
		j, err := json.Marshal(c.Doc)
		return append(b, j...), err
	case ChangeMeta:
		j, err := json.Marshal(c.Meta)
		return append(b, j...), err
	case ChangeUser:
		j, err := json.Marshal(c.User)
		return append(b, j...), err
	}
	return nil, fmt.Errorf("encode change: unknown kind %d", c.Kind)
}

func decodeChange(seq uint64, b []byte) (Change, error) {
	c := Change{Seq: seq}
	var err error
	if len(b) < 9 {
		return c, errCorrupt
	}
	c.Kind = ChangeKind(b[0] &^ kindActor)
	hasActor := b[0]&kindActor != 0
	c.Stamp = hlc.Timestamp(binary.BigEndian.Uint64(b[1:9]))
	b = b[9:]
	str := func() (string, bool) {
		l, w := binary.Uvarint(b)
		if w <= 0 || uint64(len(b)-w) < l {
			return "", false
		}
		v := string(b[w : w+int(l)])
		b = b[w+int(l):]
		return v, true
	}
	var ok bool
	if c.Device, ok = str(); !ok {
		return c, errCorrupt
	}
	if hasActor {
		if c.By.OpenID, ok = str(); !ok {
			return c, errCorrupt
		}
		if c.By.Proof, ok = str(); !ok {
			return c, errCorrupt
		}
	}
	switch c.Kind {
	case ChangeReadings:
		n, w := binary.Uvarint(b)
		if w <= 0 || n > uint64(len(b)) {
			return c, errCorrupt
		}
		b = b[w:]
		c.Readings, err = decodeOutboxReadings(b, n)
		return c, err
	case ChangeReported, ChangeDesired:
		return c, json.Unmarshal(b, &c.Doc)
	case ChangeMeta:
		c.Meta = new(DeviceMeta)
		return c, json.Unmarshal(b, c.Meta)
	case ChangeUser:
		c.User = new(User)
		return c, json.Unmarshal(b, c.User)
	}
	return c, fmt.Errorf("%w: unknown change kind %d", errCorrupt, c.Kind)
}

// decodeOutboxReadings reads the n readings of a readings entry, b the
// rest of it. The syncer reads the whole backlog through here: the ids and
// metric names are cut from one copy of b, and the metrics from one slab,
// instead of allocating each (a reading cost three allocations).
func decodeOutboxReadings(b []byte, n uint64) ([]Reading, error) {
	rec := string(b) // b is bbolt's memory, valid only in its transaction
	rs := make([]Reading, 0, n)
	ms := make([]Metric, 0, 2*n)
	p := 0
	for i := uint64(0); i < n; i++ {
		var r Reading
		ts, w := binary.Varint(b[p:])
		if w <= 0 {
			return nil, errCorrupt
		}
		r.TS = ts
		p += w
		il, w := binary.Uvarint(b[p:])
		if w <= 0 || uint64(len(b)-p-w) < il {
			return nil, errCorrupt
		}
		p += w
		r.ID = rec[p : p+int(il)]
		p += int(il)
		m, w := binary.Uvarint(b[p:])
		if w <= 0 || m > uint64(len(b)-p) {
			return nil, errCorrupt
		}
		p += w
		at := len(ms)
		for j := uint64(0); j < m; j++ {
			l, w := binary.Uvarint(b[p:])
			if w <= 0 || l > uint64(len(b)-p-w) || uint64(len(b)-p-w)-l < 8 {
				return nil, errCorrupt
			}
			p += w
			name := rec[p : p+int(l)]
			p += int(l)
			ms = append(ms, Metric{Name: name, Value: math.Float64frombits(binary.BigEndian.Uint64(b[p:]))})
			p += 8
		}
		if m > 0 {
			// Earlier readings keep their part of a slab append outgrew.
			r.Metrics = ms[at:len(ms):len(ms)]
		}
		rs = append(rs, r)
	}
	return rs, nil
}

// appendOutbox assigns the next sequence to c and writes it. Callers hold the
// write transaction, which serialises sequence allocation. Once tx commits,
// the entry is in the outbox tail too.
func (s *Store) appendOutbox(tx *bolt.Tx, head *uint64, c *Change) error {
	*head++
	c.Seq = *head
	return s.putOutbox(tx, c)
}

// putOutbox writes the outbox entry c, whose sequence is taken, and hands
// it to the outbox tail.
func (s *Store) putOutbox(tx *bolt.Tx, c *Change) error {
	v, err := encodeChange(c)
	if err != nil {
		return err
	}
	if c.Kind != ChangeReadings {
		// Index state changes so the syncer can send them ahead of the
		// reading backlog without scanning it.
		if err := tx.Bucket(bucketStateIdx).Put(u64(c.Seq), nil); err != nil {
			return err
		}
	}
	if err := tx.Bucket(bucketOutbox).Put(u64(c.Seq), v); err != nil {
		return err
	}
	s.tail.record(tx, c, v)
	return nil
}

// commitMeta persists the counters changed by a write transaction. The
// in-memory copies are updated by the caller only after the commit succeeded.
func (s *Store) commitMeta(tx *bolt.Tx, head uint64, newReadings, newDevices uint64) error {
	m := tx.Bucket(bucketMeta)
	if err := m.Put(keyOutboxHead, u64(head)); err != nil {
		return err
	}
	if err := m.Put(keyHLC, u64(uint64(s.clock.Last()))); err != nil {
		return err
	}
	// Add to the persisted counters, not to the in-memory mirrors: those
	// are updated only after a commit, so a concurrent transaction (Prune,
	// SetDesired) that committed but has not updated them yet would be lost.
	if newReadings > 0 {
		if err := m.Put(keyReadings, u64(getU64(m.Get(keyReadings))+newReadings)); err != nil {
			return err
		}
	}
	if newDevices > 0 {
		if err := m.Put(keyDevices, u64(getU64(m.Get(keyDevices))+newDevices)); err != nil {
			return err
		}
	}
	return nil
}

// storeMax raises a to v unless it is already higher: commits of concurrent
// transactions may publish their outbox heads out of order.
func storeMax(a *atomic.Uint64, v uint64) {
	for {
		old := a.Load()
		if v <= old || a.CompareAndSwap(old, v) {
			return
		}
	}
}

// Outbox returns up to max changes after sequence after, stopping early once
// maxBytes of encoded changes have been collected (at least one is returned).
//
// The newest entries are served from memory (Options.OutboxTailBytes) and
// shared by every caller: callers must not change the changes returned,
// nor their Readings and Metrics.
func (s *Store) Outbox(after uint64, max, maxBytes int) ([]Change, error) {
	if out, ok, err := s.tail.read(after, max, maxBytes); ok {
		if err != nil {
			return nil, fmt.Errorf("decode outbox entry: %w", err)
		}
		return out, nil
	}
	var out []Change
	err := s.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketOutbox).Cursor()
		size := 0
		for k, v := c.Seek(u64(after + 1)); k != nil && len(out) < max; k, v = c.Next() {
			if len(out) > 0 && size+len(v) > maxBytes {
				break
			}
			ch, err := decodeChange(binary.BigEndian.Uint64(k), v)
			if err != nil {
				return fmt.Errorf("decode outbox entry %d: %w", binary.BigEndian.Uint64(k), err)
			}
			size += len(v)
			out = append(out, ch)
		}
		return nil
	})
	return out, err
}

// OldestUnsynced returns the stamp of the oldest change still in the outbox,
// or zero when it is empty.
func (s *Store) OldestUnsynced() (hlc.Timestamp, error) {
	var ts hlc.Timestamp
	err := s.db.View(func(tx *bolt.Tx) error {
		// Entries up to the ack may still be there for the rule runner.
		acked := getU64(tx.Bucket(bucketMeta).Get(keyOutboxAcked))
		k, v := tx.Bucket(bucketOutbox).Cursor().Seek(u64(acked + 1))
		if k == nil {
			return nil
		}
		if len(v) < 9 {
			return errCorrupt
		}
		ts = hlc.Timestamp(binary.BigEndian.Uint64(v[1:9]))
		return nil
	})
	return ts, err
}

// AckOutbox records that the cloud durably holds every change up to seq and
// deletes them (with Options.HoldOutboxForRules, only those the rule runner
// has evaluated too; the rest go when it has: SaveRuleEvents). Acks never
// move backwards.
func (s *Store) AckOutbox(seq uint64) error {
	if seq > s.outboxHead.Load() {
		return fmt.Errorf("ack outbox: sequence %d beyond head %d", seq, s.outboxHead.Load())
	}
	for {
		done := true
		err := s.db.Update(func(tx *bolt.Tx) error {
			m := tx.Bucket(bucketMeta)
			if seq > getU64(m.Get(keyOutboxAcked)) {
				if err := m.Put(keyOutboxAcked, u64(seq)); err != nil {
					return err
				}
			}
			var err error
			done, err = s.trimOutbox(tx)
			return err
		})
		if err != nil {
			return fmt.Errorf("ack outbox to %d: %w", seq, err)
		}
		s.outboxAck.Store(max(s.outboxAck.Load(), seq)) // safe: a failed commit only delays retention
		if done {
			s.trimPending.Store(false)
			return nil
		}
	}
}

// trimOutbox deletes, in one chunk, the outbox entries nothing needs any
// more: those the cloud acknowledged and, when the rule runner holds the
// outbox, it has evaluated. done is false when more remain to delete.
func (s *Store) trimOutbox(tx *bolt.Tx) (done bool, err error) {
	const chunk = 10000 // keep each transaction short so ingest is not starved
	m := tx.Bucket(bucketMeta)
	bound := getU64(m.Get(keyOutboxAcked))
	if s.opts.HoldOutboxForRules {
		bound = min(bound, getU64(m.Get(keyRulesSeq)))
	}
	var last uint64 // the last entry deleted
	defer func() {
		if last > 0 && err == nil {
			tx.OnCommit(func() { s.tail.trim(last) })
		}
	}()
	done, last, err = deleteThrough(tx.Bucket(bucketOutbox), bound, chunk)
	if err != nil || !done {
		return false, err
	}
	_, _, err = deleteThrough(tx.Bucket(bucketStateIdx), bound, -1)
	return err == nil, err
}

// deleteThrough deletes b's keys, which begin with a big-endian sequence,
// from the first through bound: at most limit of them (-1: all), done
// false when eligible keys remain; last is the sequence of the last one
// deleted. It finds the keys with one forward walk and then deletes them:
// deleting at the front and asking the cursor for First again walks over
// every leaf the transaction has already emptied, which made a trim of n
// entries cost n² (a seventh of an edge's CPU with rules in force, which
// trim after every commit).
func deleteThrough(b *bolt.Bucket, bound uint64, limit int) (done bool, last uint64, err error) {
	var keys [][]byte
	done = true
	c := b.Cursor()
	for k, _ := c.First(); k != nil && binary.BigEndian.Uint64(k) <= bound; k, _ = c.Next() {
		if len(keys) == limit {
			done = false
			break
		}
		keys = append(keys, bytes.Clone(k)) // k is the page's or node's, which deletes change
	}
	for _, k := range keys {
		if err := b.Delete(k); err != nil {
			return false, 0, err
		}
	}
	if len(keys) > 0 {
		last = binary.BigEndian.Uint64(keys[len(keys)-1])
	}
	return done, last, nil
}

// ---- dead letters ----

// DeadLetter is an MQTT message that could not be ingested, with the reason.
type DeadLetter struct {
	Seq     uint64 `json:"seq"`
	At      int64  `json:"at"` // Unix ms received
	Topic   string `json:"topic"`
	Reason  string `json:"reason"`
	Payload []byte `json:"payload"` // truncated to maxDeadPayload
}

const maxDeadPayload = 4096

func (s *Store) putDeadLetters(tx *bolt.Tx, dls []DeadLetter) (uint64, error) {
	if len(dls) == 0 {
		return s.deadCount.Load(), nil
	}
	m := tx.Bucket(bucketMeta)
	b := tx.Bucket(bucketDead)
	next := getU64(m.Get(keyDeadNext))
	count := getU64(m.Get(keyDeadCount))
	for i := range dls {
		d := dls[i]
		next++
		d.Seq = next
		if len(d.Payload) > maxDeadPayload {
			d.Payload = d.Payload[:maxDeadPayload]
		}
		v, err := json.Marshal(d)
		if err != nil {
			return 0, err
		}
		if err := b.Put(u64(next), v); err != nil {
			return 0, err
		}
		count++
	}
	c := b.Cursor()
	for k, _ := c.First(); k != nil && count > uint64(s.opts.MaxDeadLetters); k, _ = c.First() {
		if err := c.Delete(); err != nil {
			return 0, err
		}
		count--
	}
	if err := m.Put(keyDeadNext, u64(next)); err != nil {
		return 0, err
	}
	return count, m.Put(keyDeadCount, u64(count))
}

// DeadLetters returns up to limit dead letters with sequence after after.
func (s *Store) DeadLetters(after uint64, limit int) ([]DeadLetter, error) {
	var out []DeadLetter
	err := s.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketDead).Cursor()
		for k, v := c.Seek(u64(after + 1)); k != nil && len(out) < limit; k, v = c.Next() {
			var d DeadLetter
			if err := json.Unmarshal(v, &d); err != nil {
				return fmt.Errorf("decode dead letter: %w", err)
			}
			out = append(out, d)
		}
		return nil
	})
	return out, err
}
