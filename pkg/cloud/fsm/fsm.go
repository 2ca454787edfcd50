// Package fsm is the cloud's replicated state machine: merged readings,
// device shadows, users and roles, the edge directory and the cluster's node
// addresses, kept in one bbolt file and changed only by raft log entries.
//
// Apply is deterministic: it never reads the wall clock or any other local
// input; every time it records came from the leader inside the command. The
// bbolt file persists the last applied raft index in the same transaction as
// the state, so a restarted node skips entries it already applied and needs no
// snapshot restore on start. Snapshots stream a consistent bbolt copy (a read
// transaction) and Restore swaps a received copy in atomically by rename.
package fsm

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/hashicorp/raft"
	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/lww"
	"github.com/outpost-edge/outpost/pkg/shadow"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Sentinel errors callers branch on.
var (
	// ErrSeqGap: a push started beyond the next sequence the cloud expects.
	ErrSeqGap = errors.New("sequence gap")
	// ErrNotFound: no such device, edge or user.
	ErrNotFound = errors.New("not found")
	// ErrBadCursor: a cursor that this node did not issue.
	ErrBadCursor = errors.New("bad cursor")
	// ErrSeqConflict: a push re-sends sequence numbers the cloud already
	// applied, with other content than it applied (sequence squatting, or
	// two edges sharing one id), or ones it can no longer check.
	ErrSeqConflict = errors.New("sequence already applied with different content")
)

var (
	bktMeta     = []byte("meta")
	bktReadings = []byte("readings")        // device 0 ts(8) edge 0 id → metrics
	bktReadID   = []byte("reading_id")      // edge 0 device 0 id → ts(8): an older version's; read by retention only
	bktDevices  = []byte("devices")         // device → Device JSON
	bktSeen     = []byte("device_seen")     // device → last seen ms(8), newer than the record's
	bktEdges    = []byte("edges")           // edge → edgeRecord JSON
	bktSeq      = []byte("edge_seq")        // edge → acked seq (8), then its digest chain (restrict.go)
	bktLog      = []byte("log")             // raft index(8) → merged changes
	bktDown     = []byte("downlink")        // raft index(8) sub(4) → downRecord JSON
	bktNodes    = []byte("nodes")           // node id → Node JSON
	bktUsers    = []byte("users")           // openid → wire.User JSON
	bktPolicies = []byte("policies")        // name → rego text
	bktSessions = []byte("sessions")        // family → sessionRecord JSON
	bktSessUser = []byte("session_user")    // openid 0 family → nil
	bktSessExp  = []byte("session_expiry")  // be64(ms) kind(1) id → nil: what purge removes, oldest first
	bktRevoked  = []byte("session_revoked") // openid → watermark JSON
	// Readings of small changes wait here, in log order, until enough have
	// gathered to move into readings together (see stage.go).
	bktRecent = []byte("readings_recent") // raft index(8) n(4) → staged reading
	// The digest chain of each edge's sequenced stream at the end of its
	// last digestWindow pushes (see push).
	bktDigest = []byte("edge_digest") // edge → [seq(8) chain digest(16)] × up to digestWindow, oldest first: the old layout, now in edge_seq (restrict.go)
	// The downlink by target, so a pull reads only its edge's entries and
	// the broadcasts (see downlink.go), and each edge's acknowledged pull
	// position, up to which its entries are deleted.
	bktDownIdx = []byte("downlink_target") // target 0 raft index(8) sub(4) → nil
	bktPulled  = []byte("edge_pulled")     // edge → raft index(8) sub(4) at ms(8)

	keyApplied = []byte("applied_index")
	keyStamp   = []byte("max_stamp")
	keySignKey = []byte("signing_key")
)

var allBuckets = [][]byte{bktMeta, bktReadings, bktReadID, bktDevices, bktEdges, bktSeq, bktLog, bktDown, bktNodes, bktUsers, bktPolicies,
	bktSessions, bktSessUser, bktSessExp, bktRevoked, bktRecent, bktSeen, bktDigest, bktLogMarks, bktDownIdx, bktPulled}

// Device is a device's merged record.
type Device struct {
	ID        string    `json:"id"`
	EdgeID    string    `json:"edge_id"`
	FirstSeen int64     `json:"first_seen"`
	LastSeen  int64     `json:"last_seen"`
	Region    string    `json:"region"`
	Tags      wire.Tags `json:"tags"` // state written before tags were an object holds a list; Tags decodes both
	Owners    []string  `json:"owners"`
	// MetaStamp orders meta writes (owners, region, tags): last writer wins.
	MetaStamp hlc.Timestamp `json:"meta_stamp,omitzero"`
	Reported  shadow.Doc    `json:"reported"`
	Desired   shadow.Doc    `json:"desired"`
}

type edgeRecord struct {
	ID              string         `json:"id"`
	Region          string         `json:"region,omitempty"`
	Location        *wire.Location `json:"location,omitempty"`
	Advertise       string         `json:"advertise,omitempty"`
	Backlog         uint64         `json:"backlog"`
	LastHeartbeatMs int64          `json:"last_heartbeat_ms"`
	OldestUnsynced  int64          `json:"oldest_unsynced_ms,omitempty"`
}

// downRecord is a change queued for edges to pull.
type downRecord struct {
	Target string      `json:"target"` // edge id, or "*" for every edge
	Origin string      `json:"origin"` // edge that caused it, "" for the cloud
	Change wire.Change `json:"change"`
	// AtMs is the leader's time of the command that queued it (0 in
	// entries written before it was recorded).
	AtMs int64 `json:"at_ms,omitempty"`
}

// Result is the outcome of one command.
type Result struct {
	Err        error
	Expected   uint64 // with ErrSeqGap
	AckedSeq   uint64
	Applied    int
	Duplicates int
	Index      uint64
	Device     *Device // for desired and meta writes: the record after the write
	// Next is where a chunked compaction resumes (CompactCmd.After); empty
	// when the pass is done.
	Next string
}

// Hooks lets the owner observe the state machine without this package
// knowing about metrics.
type Hooks struct {
	OnRestore  func()
	OnReadings func(added, dups int)
	// OnConflicts reports fields (and meta and user records) a merge
	// discarded because the stored one was newer: concurrent writes that
	// last-writer-wins resolved. Counted on every node's apply.
	OnConflicts func(n int)
}

// FSM implements raft.BatchingFSM over bbolt.
type FSM struct {
	path  string
	log   *slog.Logger
	hooks Hooks

	mu sync.RWMutex // held for writing only while Restore swaps db
	db *bolt.DB

	applied  atomic.Uint64
	maxStamp atomic.Uint64

	waitMu sync.Mutex
	waitCh chan struct{} // closed and replaced after every apply

	// Only the apply path (raft's FSM goroutine, or Open and Restore before
	// and instead of it) touches stage and devices.
	stage stageIndex
	// devices caches decoded device records across transactions, so a
	// device pushing every second is not decoded every second. Apply is
	// the only writer of device records, so the cache is never stale; a
	// restore empties it.
	devices map[string]*Device
	// newest bounds each device's stored readings (newestKeys), so that a
	// backlog's readings need no dedup lookup. Reset with devices.
	newest newestKeys

	// pulls wakes held pulls when something for them commits (downlink.go).
	pulls pullHub
	// edgesIndex and setsIndex are the last applied index that wrote an
	// edge's directory record, and the policies or the signing key: what
	// the service's caches of those compare against. In memory only (the
	// applied index at open), so they may move without a change, never
	// the other way round.
	edgesIndex atomic.Uint64
	setsIndex  atomic.Uint64
	// seqs caches each edge's committed sequence (edge → uint64), which
	// the push path reads for every push: a bbolt read transaction cost
	// more than the lookup it made. Written after each apply commit (only
	// a.push writes edge_seq, through putSeq), read and emptied under mu,
	// so a reader sees the committed value or an older one, which the
	// push path treats as "not yet committed" and leaves to Apply.
	seqs sync.Map
	// bulkMax bounds the large changes' readings queued in a transaction
	// (defaultBulkFlushAt; tests lower it).
	bulkMax int
}

// maxCachedDevices bounds the device cache; past it the cache starts over.
const maxCachedDevices = 16384

var _ raft.BatchingFSM = (*FSM)(nil)

func boltOptions() *bolt.Options {
	return &bolt.Options{
		// No fsync: the raft log (fsynced) is the durable record. A process
		// crash loses nothing (writes are in the page cache); after a power
		// loss Open discards a corrupt file and raftnode restores the newest
		// snapshot and replays the log after it.
		NoSync: true,
		// A large virtual map so the file rarely remaps: a remap waits for
		// every read transaction, including a snapshot being streamed.
		InitialMmapSize: 1 << 30,
		FreelistType:    bolt.FreelistMapType,
		NoFreelistSync:  true,
	}
}

// Open opens (creating if needed) the state file at path.
func Open(path string, log *slog.Logger, hooks Hooks) (*FSM, error) {
	f := &FSM{path: path, log: log, hooks: hooks, waitCh: make(chan struct{}),
		stage: stageIndex{max: defaultStageMax, flushAt: defaultStageFlushAt}, bulkMax: defaultBulkFlushAt, pulls: newPullHub()}
	db, err := openDB(path)
	if errors.Is(err, berrors.ErrInvalid) || errors.Is(err, berrors.ErrChecksum) || errors.Is(err, berrors.ErrVersionMismatch) {
		// Rebuildable from the snapshot and log: keep the bad file for
		// inspection and start empty.
		aside := fmt.Sprintf("%s.corrupt-%d", path, os.Getpid())
		log.Error("state file unreadable; rebuilding it from the raft snapshot and log", "err", err, "moved_to", aside)
		if rerr := os.Rename(path, aside); rerr != nil {
			return nil, fmt.Errorf("move aside corrupt state: %w", rerr)
		}
		db, err = openDB(path)
	}
	if err != nil {
		return nil, err
	}
	f.db = db
	if err := f.loadMeta(); err != nil {
		_ = db.Close()
		return nil, err
	}
	return f, nil
}

func openDB(path string) (*bolt.DB, error) {
	db, err := bolt.Open(path, 0o600, boltOptions())
	if err != nil {
		return nil, fmt.Errorf("open state %s: %w", path, err)
	}
	err = db.Update(func(tx *bolt.Tx) error {
		for _, b := range allBuckets {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("init state %s: %w", path, err)
	}
	return db, nil
}

func (f *FSM) loadMeta() error {
	if err := f.db.Update(indexDownlink); err != nil {
		return fmt.Errorf("index downlink: %w", err)
	}
	return f.db.View(func(tx *bolt.Tx) error {
		m := tx.Bucket(bktMeta)
		f.applied.Store(getU64(m.Get(keyApplied)))
		f.maxStamp.Store(getU64(m.Get(keyStamp)))
		f.edgesIndex.Store(f.applied.Load())
		f.setsIndex.Store(f.applied.Load())
		f.devices, f.newest = map[string]*Device{}, newestKeys{}
		return f.stage.load(tx.Bucket(bktRecent))
	})
}

// Close closes the state file.
func (f *FSM) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.db.Close()
}

// AppliedIndex is the last raft index reflected in the state.
func (f *FSM) AppliedIndex() uint64 { return f.applied.Load() }

// MaxStamp is the greatest HLC stamp in any applied shadow: a new leader
// raises its clock to it so its stamps win over everything already stored.
func (f *FSM) MaxStamp() hlc.Timestamp { return hlc.Timestamp(f.maxStamp.Load()) }

// WaitApplied blocks until the state reflects index or done is closed.
func (f *FSM) WaitApplied(done <-chan struct{}, index uint64) bool {
	for {
		f.waitMu.Lock()
		ch := f.waitCh
		f.waitMu.Unlock()
		if f.applied.Load() >= index {
			return true
		}
		select {
		case <-ch:
		case <-done:
			return false
		}
	}
}

func (f *FSM) notify() {
	f.waitMu.Lock()
	close(f.waitCh)
	f.waitCh = make(chan struct{})
	f.waitMu.Unlock()
}

// Apply applies one log entry.
func (f *FSM) Apply(l *raft.Log) any { return f.ApplyBatch([]*raft.Log{l})[0] }

// ApplyBatch applies consecutive log entries in one bbolt transaction. Each
// command entry's response is a []Result, one per command in the entry.
func (f *FSM) ApplyBatch(logs []*raft.Log) []any {
	out := make([]any, len(logs))
	f.mu.RLock()
	defer f.mu.RUnlock()
	applied := f.applied.Load()
	last := applied
	if len(f.devices) > maxCachedDevices {
		f.devices = map[string]*Device{}
	}
	if len(f.newest) > maxCachedDevices {
		f.newest = newestKeys{}
	}
	a := applier{devices: f.devices, newest: f.newest, raised: map[string][]byte{}, dirty: map[string]bool{},
		maxStamp: hlc.Timestamp(f.maxStamp.Load()), stage: &f.stage, bulkMax: f.bulkMax}
	err := f.db.Update(func(tx *bolt.Tx) error {
		a.tx = tx
		a.bk = buckets(tx)
		for i, l := range logs {
			if l.Index <= applied {
				continue // already in the state: a replay after restart
			}
			last = l.Index
			if l.Type != raft.LogCommand {
				continue
			}
			res, err := a.entry(l.Index, l.Data)
			if err != nil {
				// A malformed entry must not stop the cluster; every replica
				// rejects it identically.
				f.log.Error("skipping undecodable raft entry", "index", l.Index, "err", err)
				continue
			}
			out[i] = res
		}
		if last == applied {
			return nil
		}
		if err := a.flushBulk(); err != nil {
			return err
		}
		if err := a.flushDevices(); err != nil {
			return err
		}
		if f.stage.n >= f.stage.flushAt {
			if err := a.flushStage(); err != nil {
				return err
			}
		}
		m := a.bk.meta
		if err := m.Put(keyApplied, u64(last)); err != nil {
			return err
		}
		return m.Put(keyStamp, u64(uint64(a.maxStamp)))
	})
	if err != nil {
		// The state can no longer follow the log; continuing would diverge
		// from the other replicas.
		panic(fmt.Sprintf("fsm: apply at index %d: %v", last, err))
	}
	for edge, seq := range a.seqs {
		f.seqs.Store(edge, seq)
	}
	for dev, k := range a.raised {
		f.newest[dev] = bytes.Clone(k) // k is the transaction's memory
	}
	f.applied.Store(last)
	f.maxStamp.Store(uint64(a.maxStamp))
	if a.edgesChanged {
		f.edgesIndex.Store(last)
	}
	if a.setsChanged {
		f.setsIndex.Store(last)
	}
	// A directory record does not wake held pulls: the service's liveness
	// sweep coalesces directory changes (a fleet registering would wake
	// every pull once per edge).
	f.pulls.wake(a.targets, a.broadcast || a.setsChanged)
	if f.hooks.OnReadings != nil && (a.added > 0 || a.dups > 0) {
		f.hooks.OnReadings(a.added, a.dups)
	}
	if f.hooks.OnConflicts != nil && a.conflicts > 0 {
		f.hooks.OnConflicts(a.conflicts)
	}
	f.notify()
	return out
}

type bkts struct {
	meta, readings, readID, devices, edges, seq, log, down, nodes, users, policies        *bolt.Bucket
	sessions, sessUser, sessExp, revoked, recent, seen, digest, logMarks, downIdx, pulled *bolt.Bucket
}

func buckets(tx *bolt.Tx) bkts {
	return bkts{
		meta: tx.Bucket(bktMeta), readings: tx.Bucket(bktReadings), readID: tx.Bucket(bktReadID),
		devices: tx.Bucket(bktDevices), edges: tx.Bucket(bktEdges), seq: tx.Bucket(bktSeq),
		log: tx.Bucket(bktLog), down: tx.Bucket(bktDown), nodes: tx.Bucket(bktNodes), users: tx.Bucket(bktUsers),
		policies: tx.Bucket(bktPolicies),
		sessions: tx.Bucket(bktSessions), sessUser: tx.Bucket(bktSessUser), sessExp: tx.Bucket(bktSessExp),
		revoked: tx.Bucket(bktRevoked), recent: tx.Bucket(bktRecent), seen: tx.Bucket(bktSeen),
		digest: tx.Bucket(bktDigest), logMarks: tx.Bucket(bktLogMarks), downIdx: tx.Bucket(bktDownIdx), pulled: tx.Bucket(bktPulled),
	}
}

// applier holds one ApplyBatch transaction's working set. Device records
// come from the FSM's cache and are written once at the end, and only if more
// than their last-seen time changed (dirty: true); a new last-seen time alone
// goes to the small device_seen bucket (dirty: false), which saves encoding
// the record and rewriting its pages on every push.
type applier struct {
	tx        *bolt.Tx
	bk        bkts
	devices   map[string]*Device
	dirty     map[string]bool // device → record changed (else only last seen)
	maxStamp  hlc.Timestamp
	added     int
	dups      int
	conflicts int
	stage     *stageIndex
	bulk      bulkPuts
	newest    newestKeys        // the FSM's, filled as devices are asked for
	raised    map[string][]byte // bounds this transaction raised (its keys)
	readCur   *bolt.Cursor      // on readings, for dedup lookups
	seqs      map[string]uint64 // edges' sequences this transaction moved
	bulkMax   int

	// What held pulls wait for (downlink.go): the targets of new downlink
	// entries, a broadcast among them, and changes to the sets a pull
	// carries.
	targets      map[string]bool
	broadcast    bool
	edgesChanged bool
	setsChanged  bool

	// per command
	atMs int64

	// per entry
	index    uint64
	logBuf   []byte
	logN     int
	downSub  uint32
	stageSub uint32
}

func (a *applier) entry(index uint64, data []byte) ([]Result, error) {
	cmds, err := splitEntry(data)
	if err != nil {
		return nil, err
	}
	// The entry's log value is built in place behind room for its count,
	// and put as is: one allocation, about the entry's size.
	if cap(a.logBuf) < len(data)+logHead {
		a.logBuf = make([]byte, 0, logHead+len(data)+len(data)/8+64)
	}
	a.index, a.logBuf, a.logN, a.downSub, a.stageSub = index, a.logBuf[:logHead], 0, 0, 0
	res := make([]Result, len(cmds))
	for i, raw := range cmds {
		d, err := decodeCommand(raw)
		if err != nil {
			res[i] = Result{Err: err, Index: index}
			continue
		}
		r, err := a.command(d)
		if err != nil {
			return nil, err
		}
		r.Index = index
		res[i] = r
	}
	if a.logN > 0 {
		var n [binary.MaxVarintLen64]byte
		c := binary.PutUvarint(n[:], uint64(a.logN))
		v := a.logBuf[logHead-c:]
		copy(v, n[:c])
		a.bk.log.FillPercent = 1 // keyed by raft index: appended in order
		if err := a.bk.log.Put(u64(index), v); err != nil {
			return nil, err
		}
		a.logBuf = nil // bbolt holds v until the commit
	}
	return res, nil
}

// command applies one command; a returned error aborts the transaction (a
// storage failure), while refusals travel in Result.Err.
func (a *applier) command(d *decodedCmd) (Result, error) {
	a.atMs = d.AtMs
	switch d.Type {
	case CmdPush:
		return a.push(d)
	case CmdDesired, CmdMeta:
		c := d.Cmd.Change
		if !validDeviceKey(c.Device) {
			return Result{Err: fmt.Errorf("%w: device id %.64q", ErrCorrupt, c.Device)}, nil
		}
		rc := rawChange{Kind: c.Kind, Device: c.Device, Other: c}
		if err := a.change("", d.AtMs, &rc); err != nil {
			return Result{}, err
		}
		dev, err := a.device(c.Device, d.AtMs)
		if err != nil {
			return Result{}, err
		}
		cp := *dev
		cp.Reported, cp.Desired = dev.Reported.Clone(), dev.Desired.Clone()
		return Result{Applied: 1, Device: &cp}, nil
	case CmdHeartbeat:
		h := d.Cmd.Heartbeat
		rec := edgeRecord{ID: h.Edge, Region: h.Region, Location: h.Location, Advertise: h.Advertise,
			Backlog: h.Backlog, LastHeartbeatMs: d.AtMs, OldestUnsynced: h.OldestUnsyncedMs}
		a.edgesChanged = true
		return Result{AckedSeq: getU64(a.bk.seq.Get([]byte(h.Edge)))}, putJSON(a.bk.edges, h.Edge, rec)
	case CmdNodeUpsert:
		return Result{Applied: 1}, putJSON(a.bk.nodes, d.Cmd.Node.ID, d.Cmd.Node)
	case CmdNodeRemove:
		return Result{Applied: 1}, a.bk.nodes.Delete([]byte(d.Cmd.NodeID))
	case CmdUserPut:
		n, err := a.user("", d.Cmd.User)
		return Result{Applied: n}, err
	case CmdState:
		n := 0
		for i := range d.Changes {
			if err := a.change(d.Edge, d.AtMs, &d.Changes[i]); err != nil {
				return Result{}, err
			}
			n++
		}
		return Result{Applied: n}, nil
	case CmdPolicyPut:
		p := d.Cmd.Policy
		a.setsChanged = true
		if p.Rego == "" {
			return Result{Applied: 1}, a.bk.policies.Delete([]byte(p.Name))
		}
		return Result{Applied: 1}, a.bk.policies.Put([]byte(p.Name), []byte(p.Rego))
	case CmdSigningKey:
		// The first key wins: two leaders racing to create one (after a
		// failover) must not leave tokens signed by a key nobody keeps.
		if a.bk.meta.Get(keySignKey) != nil {
			return Result{}, nil
		}
		a.setsChanged = true
		return Result{Applied: 1}, putJSON(a.bk.meta, string(keySignKey), d.Cmd.Key)
	case CmdSessionCreate:
		return a.sessionCreate(d.Cmd.Session)
	case CmdSessionRotate:
		return a.sessionRotate(d.Cmd.Session)
	case CmdSessionRevokeUser:
		return a.sessionRevokeUser(d.Cmd.Session)
	case CmdSessionPurge:
		return a.sessionPurge(d.Cmd.Session)
	case CmdPullAcks:
		return a.pullAcks(d.Cmd.PullAcks)
	case CmdCompact:
		return a.compact(d.AtMs, d.Cmd.Compact)
	case CmdSinkCursor:
		return a.sinkCursor(d.Cmd.Sink)
	case CmdRulePut:
		return a.rulePut(a.index, d.Cmd.Rule)
	case CmdAlerts:
		return a.alerts(d.Cmd.Alerts)
	case CmdNotifyDone:
		return a.notifyDone(d.Cmd.Notify)
	}
	return Result{Err: fmt.Errorf("%w: command type %d", ErrCorrupt, d.Type)}, nil
}

func (a *applier) push(d *decodedCmd) (Result, error) {
	key := []byte(d.Edge)
	rec := readSeq(a.bk.seq, a.bk.digest, key)
	last := rec.last
	if d.FirstSeq > last+1 {
		return Result{Err: fmt.Errorf("%w: expected sequence %d, got %d", ErrSeqGap, last+1, d.FirstSeq),
			Expected: last + 1, AckedSeq: last}, nil
	}
	skip := last + 1 - d.FirstSeq // changes this edge already delivered
	if skip > 0 && d.Digests != nil {
		// A re-send is a duplicate only if it is what was applied.
		if err := verifyChain(rec, d.Edge, d.FirstSeq, d.Digests); err != nil {
			return Result{Err: err, AckedSeq: last}, nil
		}
	}
	if skip >= uint64(len(d.Changes)) {
		return Result{AckedSeq: last}, nil
	}
	// The record is built before the changes apply: rec.chain is bbolt's
	// memory, valid only until the transaction's next write.
	newLast := d.FirstSeq + uint64(len(d.Changes)) - 1
	var head *wire.Digest
	if d.Digests != nil {
		h, _ := chainAt(rec.chain, last)
		for i := skip; i < uint64(len(d.Changes)); i++ {
			h = wire.ChainDigest(h, d.Digests[i])
		}
		head = &h
	}
	v := seqValue(rec, newLast, head)
	bulk := 0
	for i := skip; i < uint64(len(d.Changes)); i++ {
		if n := len(d.Changes[i].Readings); n > a.stage.max {
			bulk += n
		}
	}
	a.bulk.reserve(bulk) // the queue grows once per push
	before := a.dups
	for i := skip; i < uint64(len(d.Changes)); i++ {
		if err := a.change(d.Edge, d.AtMs, &d.Changes[i]); err != nil {
			return Result{}, err
		}
	}
	if err := putSeq(a.bk.seq, a.bk.digest, key, rec, v); err != nil {
		return Result{}, err
	}
	if a.seqs == nil {
		a.seqs = map[string]uint64{}
	}
	a.seqs[d.Edge] = newLast
	return Result{AckedSeq: newLast, Applied: len(d.Changes) - int(skip), Duplicates: a.dups - before}, nil
}

// user applies a user record if it is newer than the stored one (last writer
// wins by stamp) and queues it for every edge but its origin.
func (a *applier) user(origin string, u *wire.User) (int, error) {
	nu, err := json.Marshal(u)
	if err != nil {
		return 0, err
	}
	if v := a.bk.users.Get([]byte(u.OpenID)); v != nil {
		var cur wire.User
		if err := json.Unmarshal(v, &cur); err != nil {
			return 0, fmt.Errorf("decode user %s: %w", u.OpenID, err)
		}
		if c := lww.Compare(*u, cur); c <= 0 {
			if c < 0 {
				a.conflicts++ // an older write lost, not the same one again
			}
			return 0, nil
		}
	}
	if u.Stamp > a.maxStamp {
		a.maxStamp = u.Stamp
	}
	if err := a.bk.users.Put([]byte(u.OpenID), nu); err != nil {
		return 0, err
	}
	return 1, a.downlink("*", origin, wire.Change{Kind: wire.KindUser, User: u})
}

func (a *applier) device(id string, atMs int64) (*Device, error) {
	if d, ok := a.devices[id]; ok {
		return d, nil
	}
	d := &Device{}
	if v := a.bk.devices.Get([]byte(id)); v != nil {
		if err := json.Unmarshal(v, d); err != nil {
			return nil, fmt.Errorf("decode device %s: %w", id, err)
		}
		if seen := int64(getU64(a.bk.seen.Get([]byte(id)))); seen > d.LastSeen {
			d.LastSeen = seen
		}
	} else {
		d.ID, d.FirstSeen = id, atMs
		a.dirty[id] = true
	}
	if d.Reported == nil {
		d.Reported = shadow.Doc{}
	}
	if d.Desired == nil {
		d.Desired = shadow.Doc{}
	}
	a.devices[id] = d
	return d, nil
}

// changed marks dev's record for rewriting.
func (a *applier) changed(dev *Device) { a.dirty[dev.ID] = true }

// seen records a newer last-seen time for dev.
func (a *applier) seen(dev *Device, ms int64) {
	if ms > dev.LastSeen {
		dev.LastSeen = ms
		if _, ok := a.dirty[dev.ID]; !ok {
			a.dirty[dev.ID] = false // present: at least the time is written
		}
	}
}

func (a *applier) flushDevices() error {
	ids := make([]string, 0, len(a.dirty))
	for id := range a.dirty {
		ids = append(ids, id)
	}
	sort.Strings(ids) // bbolt inserts fastest in key order
	for _, id := range ids {
		dev := a.devices[id]
		if a.dirty[id] {
			if err := putJSON(a.bk.devices, id, dev); err != nil {
				return err
			}
		}
		if err := a.bk.seen.Put([]byte(id), u64(uint64(dev.LastSeen))); err != nil {
			return err
		}
	}
	return nil
}

// change applies one change from origin ("" for the cloud's own API).
func (a *applier) change(origin string, atMs int64, c *rawChange) error {
	if c.Refused != nil {
		return a.correct(origin, atMs, c.Refused)
	}
	if c.Kind == wire.KindUser {
		if c.Other == nil || c.Other.User == nil {
			return nil
		}
		_, err := a.user(origin, c.Other.User)
		return err
	}
	if !validDeviceKey(c.Device) || c.Kind == wire.KindMeta && (c.Other == nil || c.Other.Meta == nil) {
		// A change without a usable device id or a meta change without
		// meta (an edge can push either) is a no-op, as a user change
		// without a user: storing or dereferencing it would stop every
		// replica at this index.
		return nil
	}
	dev, err := a.device(c.Device, atMs)
	if err != nil {
		return err
	}
	if dev.EdgeID == "" && origin != "" {
		// The device's home is the first edge it appears at; desired state
		// written in the cloud before then (pre-provisioning) goes there now.
		dev.EdgeID = origin
		a.changed(dev)
		if len(dev.Desired) > 0 {
			if err := a.downlink(origin, "", wire.Change{Kind: wire.KindDesired, Device: dev.ID, Doc: dev.Desired.Clone()}); err != nil {
				return err
			}
		}
	}
	if origin != "" {
		a.seen(dev, atMs)
	}
	switch c.Kind {
	case wire.KindReadings:
		return a.readings(origin, dev, c)
	case wire.KindReported, wire.KindDesired:
		doc := dev.Reported
		if c.Kind == wire.KindDesired {
			doc = dev.Desired
		}
		changed := doc.Merge(c.Other.Doc)
		a.countLost(doc, c.Other.Doc, len(changed))
		if len(changed) == 0 {
			return nil
		}
		a.changed(dev)
		delta := make(shadow.Doc, len(changed))
		for _, k := range changed {
			delta[k] = doc[k]
		}
		if v := delta.Version(); v > a.maxStamp {
			a.maxStamp = v
		}
		if c.Kind == wire.KindReported && origin != "" && dev.EdgeID != origin {
			// Newer reported state from another edge: the device moved
			// there (its home is where it currently publishes), and the
			// cloud's desired state follows it.
			dev.EdgeID = origin
			if len(dev.Desired) > 0 {
				if err := a.downlink(origin, "", wire.Change{Kind: wire.KindDesired, Device: dev.ID, Doc: dev.Desired.Clone()}); err != nil {
					return err
				}
			}
		}
		out := wire.Change{Kind: c.Kind, Device: dev.ID, Doc: delta}
		if err := a.logChange(origin, atMs, &rawChange{Kind: c.Kind, Device: dev.ID, Other: &out}); err != nil {
			return err
		}
		if c.Kind == wire.KindDesired && dev.EdgeID != "" && dev.EdgeID != origin {
			return a.downlink(dev.EdgeID, origin, out)
		}
		return nil
	case wire.KindMeta:
		m := c.Other.Meta
		if cmp := lww.Compare(*m, wire.Meta{Owners: dev.Owners, Region: dev.Region, Tags: dev.Tags, Stamp: dev.MetaStamp}); cmp <= 0 {
			if cmp < 0 {
				a.conflicts++
			}
			return nil // an older (or the same) meta write: last writer wins
		}
		dev.Owners, dev.Region, dev.Tags, dev.MetaStamp = m.Owners, m.Region, m.Tags, m.Stamp
		a.changed(dev)
		if m.Stamp > a.maxStamp {
			a.maxStamp = m.Stamp
		}
		if err := a.logChange(origin, atMs, c); err != nil {
			return err
		}
		if dev.EdgeID != "" && dev.EdgeID != origin {
			return a.downlink(dev.EdgeID, origin, *c.Other)
		}
		return nil
	}
	return nil
}

// countLost counts, after in was merged into doc, the fields of in that lost
// to a different stored write. A field that won is now stored as is, and the
// same write applied again (state sent ahead and then in the sequenced
// stream, a resent batch) is equal to the stored field (lww.Compare says
// the same write): neither is a conflict.
func (a *applier) countLost(doc, in shadow.Doc, changed int) {
	if changed == len(in) {
		return
	}
	for k, f := range in {
		cur := doc[k]
		if lww.Compare(f, cur) != 0 {
			a.conflicts++
		}
	}
}

// readings stores the readings not already present and logs only those.
// A reading is identified by its key, (edge, device, ts, id), where id is
// empty for a reading without one (DESIGN.md, invariant 4).
//
// A small change (the typical live push: one reading) is staged in log order
// instead of inserted under its device: inserting touches a leaf page per
// device, and bbolt decodes, re-encodes and writes every page a transaction
// touches, which made one-reading pushes from many devices cost a page
// each. Staged readings move in bulk later (flushStage); reads and dedup
// see both places.
//
// Larger changes go straight in at the end of the transaction, all of its
// readings in key order (bulkPuts).
func (a *applier) readings(origin string, dev *Device, c *rawChange) error {
	n := len(c.Readings)
	dup := make([]bool, n)
	var err error
	if n <= a.stage.max {
		err = a.stageReadings(origin, dev, c, dup)
	} else {
		err = a.putReadings(origin, dev, c, dup)
	}
	if err != nil {
		return err
	}
	fresh, dups := c.Readings, 0
	for i := range dup {
		if dup[i] {
			dups++
		}
	}
	if dups > 0 {
		fresh = make([]rawReading, 0, n-dups)
		for i, r := range c.Readings {
			if !dup[i] {
				fresh = append(fresh, r)
			}
		}
	}
	for i := range fresh {
		a.seen(dev, fresh[i].TS)
	}
	a.dups += dups
	a.added += len(fresh)
	if len(fresh) == 0 {
		return nil
	}
	return a.logChange(origin, 0, &rawChange{Kind: wire.KindReadings, Device: dev.ID, Readings: fresh})
}

// maxDeviceKey bounds a device id so that every key built from it fits
// bbolt's key size limit (32 KiB) with room for the other parts.
const maxDeviceKey = 1024

// validDeviceKey reports whether id can key a device's records; a record
// bbolt refuses aborts the whole apply transaction.
func validDeviceKey(id string) bool { return id != "" && len(id) <= maxDeviceKey }

// idKey is a reading_id key. Nothing new is written there (invariant 4);
// retention deletes the entries an older version wrote.
func idKey(origin, device, id string) []byte {
	k := make([]byte, 0, len(origin)+len(device)+len(id)+2)
	k = append(append(k, origin...), 0)
	k = append(append(k, device...), 0)
	return append(k, id...)
}

// readingsFill is the fill of the pages the readings bucket splits. A
// device's readings arrive in time order, so its inserts land after its
// newest key: bbolt's default (half-full pages on a split) would leave
// every page of a backlog half empty, twice the pages to write and keep.
// Full pages cost an insert into the middle of a device's range (a late
// reading) one more split. Layout only: answers are the same either way.
const readingsFill = 1.0

// stored reports whether the reading of device with key is already in the
// readings bucket, the stage or this transaction's queue. A reading above
// the device's bound (newestKeys) cannot be, and costs no lookup; the bound
// then rises to it, since the caller stores it.
func (a *applier) stored(device string, key []byte) bool {
	if bytes.Compare(key, a.bound(device)) > 0 {
		a.raised[device] = key
		return false
	}
	return a.stage.hasKey(key) || a.bulk.has(key) || a.inBucket(key)
}

// inBucket reports whether the readings bucket holds key. The cursor's
// Seek re-searches from the root, so it stays valid across the
// transaction's Puts, and reusing it spares Get's cursor per call.
func (a *applier) inBucket(key []byte) bool {
	if a.readCur == nil {
		a.readCur = a.bk.readings.Cursor()
	}
	k, _ := a.readCur.Seek(key)
	return bytes.Equal(k, key)
}

// bound returns a key that no stored, staged or queued reading of device
// exceeds.
func (a *applier) bound(device string) []byte {
	if k, ok := a.raised[device]; ok {
		return k
	}
	if k, ok := a.newest[device]; ok {
		return k
	}
	// Not known since open: the device's last key in the bucket (its keys
	// sort before device+0x01, ids holding no zero byte) or in the stage.
	// Nothing of the device is queued yet: its first change in this
	// transaction asks before it queues.
	if a.readCur == nil {
		a.readCur = a.bk.readings.Cursor()
	}
	prefix := append([]byte(device), 0)
	k, _ := a.readCur.Seek(append([]byte(device), 1))
	if k == nil {
		k, _ = a.readCur.Last()
	} else {
		k, _ = a.readCur.Prev()
	}
	var bound []byte
	if bytes.HasPrefix(k, prefix) {
		bound = bytes.Clone(k)
	}
	if s, ok := a.stage.newest[device]; ok && s > string(bound) {
		bound = []byte(s)
	}
	a.newest[device] = bound
	return bound
}

// newestKeys maps a device to a key no stored reading of it exceeds: a
// reading above it is not a duplicate by key, so a backlog, which a device
// sends in time order, is stored without a lookup per reading (the edge's
// store does the same). It is derived from the replicated readings (their
// keys, wherever they live), so every replica skips the same lookups, and
// only what may be stored above it matters: retention deletes readings
// under it (then it is above every stored key, still a bound) and the stage
// and queue moving readings into the bucket keep it. Apply is the only
// writer of readings; a restore or open starts it empty, and it starts over
// past maxCachedDevices, like the device cache.
type newestKeys map[string][]byte

// putReadings queues a change's readings for insertion under their device
// (a.bulk, put at the end of the transaction), marking duplicates in dup.
func (a *applier) putReadings(origin string, dev *Device, c *rawChange, dup []bool) error {
	b := &a.bulk
	b.reserve(len(c.Readings))
	for i := range c.Readings {
		r := &c.Readings[i]
		// The queue keeps each key until flushBulk (and a raised bound
		// until the commit): each gets its own (arena) memory.
		key := readingKey(b.alloc(len(dev.ID)+len(origin)+len(r.ID)+11), dev.ID, r.TS, origin, r.ID)
		if dup[i] = a.stored(dev.ID, key); dup[i] {
			b.arena = b.arena[:len(b.arena)-len(key)] // the last allocation: give it back
			continue
		}
		b.add(key, r.Metrics)
	}
	if len(b.rs) >= a.bulkMax {
		// A transaction of many large entries (a follower catching up, a
		// replay) puts in runs, which bounds the queue's memory; dedup
		// then finds the earlier runs in the bucket.
		return a.flushBulk()
	}
	return nil
}

// defaultBulkFlushAt bounds the readings queued in one transaction.
const defaultBulkFlushAt = 1 << 17

// bulkPuts gathers the readings of a transaction's large changes, to be put
// in key order when the transaction's entries are applied. bbolt splits
// nodes only at commit, so keys inserted out of order memmove ever-growing
// nodes (quadratic in the readings a transaction adds): a push of 40
// changes of 8 devices, each change sorted on its own, spent half its
// apply time in memmove, because every device's later changes land before
// keys already inserted in the same node. Sorted across the whole transaction,
// each insert lands after the previous one. The order is a pure function of
// the entries, so every replica does the same.
type bulkPuts struct {
	rs []bulkReading
	// keys indexes the queued keys, built on the first lookup that needs
	// it: a reading above its device's bound needs none, so a backlog in
	// time order never builds it.
	keys map[string]struct{}

	// arena holds the queued keys: one allocation per arenaChunk instead
	// of one per reading. bbolt copies a key it puts, but keeps the value
	// slice until commit: the metrics are the raft entry's memory.
	arena []byte
}

const arenaChunk = 64 << 10

// alloc returns an empty slice with room for n bytes in the arena.
func (b *bulkPuts) alloc(n int) []byte {
	if cap(b.arena)-len(b.arena) < n {
		b.arena = make([]byte, 0, max(arenaChunk, n))
	}
	s := b.arena[len(b.arena) : len(b.arena) : len(b.arena)+n]
	b.arena = b.arena[:len(b.arena)+n]
	return s
}

// reserve makes room for n more readings, so that a transaction's queue
// grows once per change instead of by repeated doubling.
func (b *bulkPuts) reserve(n int) { b.rs = slices.Grow(b.rs, n) }

type bulkReading struct {
	key, metrics []byte
}

func (b *bulkPuts) has(key []byte) bool {
	if b.keys == nil {
		b.keys = make(map[string]struct{}, len(b.rs))
		for i := range b.rs {
			b.keys[string(b.rs[i].key)] = struct{}{}
		}
	}
	_, ok := b.keys[string(key)]
	return ok
}

func (b *bulkPuts) add(key, metrics []byte) {
	if b.keys != nil {
		b.keys[string(key)] = struct{}{}
	}
	b.rs = append(b.rs, bulkReading{key: key, metrics: metrics})
}

// flushBulk puts the queued readings in key order and empties the queue.
// It runs before anything else in the transaction reads or moves readings
// (flushStage, commit).
func (a *applier) flushBulk() error {
	b := &a.bulk
	if len(b.rs) == 0 {
		return nil
	}
	rs := b.rs
	slices.SortFunc(rs, func(x, y bulkReading) int { return bytes.Compare(x.key, y.key) })
	a.bk.readings.FillPercent = readingsFill
	for i := range rs {
		if err := a.bk.readings.Put(rs[i].key, rs[i].metrics); err != nil {
			return err
		}
	}
	*b = bulkPuts{}
	return nil
}

func readingKey(b []byte, device string, ts int64, edge, id string) []byte {
	b = append(b, device...)
	b = append(b, 0)
	b = binary.BigEndian.AppendUint64(b, uint64(ts)^(1<<63)) // sign flip keeps order for negative ts
	b = append(b, edge...)
	b = append(b, 0)
	return append(b, id...)
}

// splitReadingKey undoes readingKey. Ids never hold a zero byte (pkg/ident),
// and the timestamp has a fixed width, so the split is unambiguous; ok is
// false for a key readingKey did not make.
func splitReadingKey(k []byte) (device string, ts int64, edge, id string, ok bool) {
	i := bytes.IndexByte(k, 0)
	if i < 0 || len(k) < i+9 {
		return "", 0, "", "", false
	}
	ts = int64(binary.BigEndian.Uint64(k[i+1:i+9]) ^ (1 << 63))
	edge, id, ok = strings.Cut(string(k[i+9:]), "\x00")
	return string(k[:i]), ts, edge, id, ok
}

// logHead is the room before an entry's log value for its change count.
const logHead = binary.MaxVarintLen64

func (a *applier) logChange(origin string, atMs int64, c *rawChange) error {
	a.logBuf = appendString(a.logBuf, origin)
	a.logBuf = binary.AppendVarint(a.logBuf, atMs)
	var err error
	a.logBuf, err = appendRawChange(a.logBuf, c)
	a.logN++
	return err
}

func putJSON(b *bolt.Bucket, key string, v any) error {
	j, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put([]byte(key), j)
}

func u64(v uint64) []byte { return binary.BigEndian.AppendUint64(make([]byte, 0, 12), v) }

// getU64 reads a big-endian uint64 value, or the first 8 bytes of a
// longer one (an edge_seq record carries its chain after the sequence).
func getU64(b []byte) uint64 {
	if len(b) < 8 {
		return 0
	}
	return binary.BigEndian.Uint64(b[:8])
}

// Snapshot captures the state as of the last applied entry. raft calls it on
// the apply goroutine, so the read transaction opened here is consistent
// with AppliedIndex; Persist streams it while applies continue.
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	f.mu.RLock()
	defer f.mu.RUnlock()
	tx, err := f.db.Begin(false)
	if err != nil {
		return nil, fmt.Errorf("fsm: snapshot: %w", err)
	}
	return &snapshot{tx: tx, tmp: f.path + ".snapshot"}, nil
}

type snapshot struct {
	once sync.Once
	tx   *bolt.Tx
	tmp  string // where the compacted copy is built
}

// Persist writes a compacted copy of the state: every bucket walked into a
// fresh file, pages filled, then streamed. A copy of the live file (tx.WriteTo)
// would carry its free pages, so a snapshot taken after retention deleted
// most of the state would be as large as the state ever was; the compacted
// copy is proportional to what is kept. The read transaction ends as soon as
// the copy is built, which also lets bbolt reuse the pages it pinned.
func (s *snapshot) Persist(sink raft.SnapshotSink) error {
	defer s.Release()
	err := s.persist(sink)
	if err != nil {
		_ = sink.Cancel()
		return fmt.Errorf("fsm: write snapshot: %w", err)
	}
	return sink.Close()
}

func (s *snapshot) persist(w io.Writer) error {
	_ = os.Remove(s.tmp)
	defer os.Remove(s.tmp)
	dst, err := bolt.Open(s.tmp, 0o600, &bolt.Options{NoSync: true, NoFreelistSync: true, FreelistType: bolt.FreelistMapType})
	if err != nil {
		return err
	}
	defer dst.Close()
	if err := compactInto(dst, s.tx); err != nil {
		return err
	}
	s.Release()
	// WriteTo stops at the copy's high-water mark: bbolt grows a file
	// ahead of its data (doubling, then 16 MiB at a time), and that tail
	// is not state.
	return dst.View(func(tx *bolt.Tx) error {
		_, err := tx.WriteTo(w)
		return err
	})
}

// compactBatch bounds the bytes copied per destination transaction: bbolt
// holds a transaction's dirty pages in memory until it commits.
const compactBatch = 16 << 20

// compactInto copies every bucket of src (nested ones too) into dst, in key
// order with full pages.
func compactInto(dst *bolt.DB, src *bolt.Tx) error {
	tx, err := dst.Begin(true)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback() }()
	size := 0
	var path [][]byte
	// bucketAt reopens the destination bucket at path in the current
	// transaction (a commit ends the old handles).
	bucketAt := func() *bolt.Bucket {
		b := tx.Bucket(path[0])
		for _, p := range path[1:] {
			b = b.Bucket(p)
		}
		b.FillPercent = 1
		return b
	}
	var walk func(srcB *bolt.Bucket) error
	walk = func(srcB *bolt.Bucket) error {
		b := bucketAt()
		c := srcB.Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			if size >= compactBatch {
				if err := tx.Commit(); err != nil {
					return err
				}
				if tx, err = dst.Begin(true); err != nil {
					return err
				}
				size = 0
				b = bucketAt()
			}
			if v == nil { // a nested bucket
				if _, err := b.CreateBucket(k); err != nil {
					return err
				}
				path = append(path, k)
				err := walk(srcB.Bucket(k))
				path = path[:len(path)-1]
				if err != nil {
					return err
				}
				b = bucketAt() // the nested walk may have committed
				continue
			}
			if err := b.Put(k, v); err != nil {
				return err
			}
			size += len(k) + len(v)
		}
		return nil
	}
	err = src.ForEach(func(name []byte, b *bolt.Bucket) error {
		if _, err := tx.CreateBucket(name); err != nil {
			return err
		}
		path = append(path[:0], name)
		return walk(b)
	})
	if err != nil {
		return err
	}
	return tx.Commit()
}

func (s *snapshot) Release() { s.once.Do(func() { _ = s.tx.Rollback() }) }

// Restore replaces the state with a snapshot: the stream goes to a side
// file, which is synced, verified by opening it, and renamed over the live
// file, so a crash at any point leaves either the old or the new state.
func (f *FSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	tmp := f.path + ".restore"
	if err := writeFileSync(tmp, rc); err != nil {
		return err
	}
	probe, err := openDB(tmp)
	if err != nil {
		return fmt.Errorf("fsm: restore: received snapshot unusable: %w", err)
	}
	if err := probe.Close(); err != nil {
		return fmt.Errorf("fsm: restore: %w", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.seqs.Clear()
	if err := f.db.Close(); err != nil {
		return fmt.Errorf("fsm: restore: close old state: %w", err)
	}
	if err := os.Rename(tmp, f.path); err != nil {
		return fmt.Errorf("fsm: restore: swap state: %w", err)
	}
	db, err := openDB(f.path)
	if err != nil {
		return fmt.Errorf("fsm: restore: reopen: %w", err)
	}
	f.db = db
	if err := f.loadMeta(); err != nil {
		return err
	}
	f.log.Info("state restored from snapshot", "applied_index", f.applied.Load())
	if f.hooks.OnRestore != nil {
		f.hooks.OnRestore()
	}
	f.pulls.wake(nil, true) // anything may have changed
	f.notify()
	return nil
}

func writeFileSync(path string, r io.Reader) error {
	out, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("fsm: restore: %w", err)
	}
	if _, err := io.Copy(out, r); err != nil {
		_ = out.Close()
		return fmt.Errorf("fsm: restore: receive snapshot: %w", err)
	}
	if err := out.Sync(); err != nil {
		_ = out.Close()
		return fmt.Errorf("fsm: restore: %w", err)
	}
	return out.Close()
}

// view runs fn in a read transaction on the current state file.
func (f *FSM) view(fn func(tx *bolt.Tx) error) error {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.db.View(fn)
}
