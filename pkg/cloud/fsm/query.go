package fsm

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"sort"
	"strconv"
	"strings"

	bolt "go.etcd.io/bbolt"

	"github.com/outpost-edge/outpost/pkg/shadow"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// GetDevice returns a device's merged record.
func (f *FSM) GetDevice(id string) (*Device, error) {
	var d Device
	err := f.view(func(tx *bolt.Tx) error {
		v := tx.Bucket(bktDevices).Get([]byte(id))
		if v == nil {
			return fmt.Errorf("device %q: %w", id, ErrNotFound)
		}
		if err := json.Unmarshal(v, &d); err != nil {
			return err
		}
		if seen := int64(getU64(tx.Bucket(bktSeen).Get([]byte(id)))); seen > d.LastSeen {
			d.LastSeen = seen
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if d.Reported == nil {
		d.Reported = shadow.Doc{}
	}
	if d.Desired == nil {
		d.Desired = shadow.Doc{}
	}
	return &d, nil
}

// StoredReading is a reading as the consumer API returns it.
type StoredReading struct {
	TS      int64              `json:"ts"`
	Edge    string             `json:"edge"`
	ID      string             `json:"id,omitempty"`
	Metrics map[string]float64 `json:"metrics"`
}

// ReadingsQuery selects a device's readings in time order.
type ReadingsQuery struct {
	Device string
	FromMs int64 // inclusive; 0 = unbounded
	ToMs   int64 // exclusive; 0 = unbounded
	Metric string
	Limit  int
	Cursor string // opaque, from a previous page
}

// Readings returns one page of readings and the cursor of the next page
// ("" when there is none). The cursor is the last key served, so pages stay
// correct while new readings arrive — never an offset.
func (f *FSM) Readings(q ReadingsQuery) ([]StoredReading, string, error) {
	prefix := append([]byte(q.Device), 0)
	seek := readingKey(nil, q.Device, q.FromMs, "", "")
	if q.FromMs == 0 {
		seek = prefix
	}
	var after []byte
	if q.Cursor != "" {
		k, err := base64.RawURLEncoding.DecodeString(q.Cursor)
		if err != nil || !bytes.HasPrefix(k, prefix) {
			return nil, "", fmt.Errorf("%w: readings cursor does not belong to device %q", ErrBadCursor, q.Device)
		}
		after = k
		if bytes.Compare(k, seek) > 0 {
			seek = k
		}
	}
	var items []StoredReading
	next := ""
	err := f.view(func(tx *bolt.Tx) error {
		staged, err := stagedFor(tx, prefix, seek)
		if err != nil {
			return err
		}
		it := mergedReadings{c: tx.Bucket(bktReadings).Cursor(), staged: staged}
		for k, v := it.seek(seek); k != nil && bytes.HasPrefix(k, prefix); k, v = it.next() {
			if after != nil && bytes.Equal(k, after) {
				continue
			}
			_, ts, edge, id, ok := splitReadingKey(k)
			if !ok {
				continue
			}
			if q.ToMs != 0 && ts >= q.ToMs {
				break
			}
			if len(items) == q.Limit {
				next = "more" // replaced by the last served key below
				break
			}
			m, err := DecodeMetrics(v)
			if err != nil {
				return err
			}
			if q.Metric != "" {
				val, ok := m[q.Metric]
				if !ok {
					continue
				}
				m = map[string]float64{q.Metric: val}
			}
			items = append(items, StoredReading{TS: ts, Edge: edge, ID: id, Metrics: m})
			after = append(after[:0], k...) // remember the last served key
		}
		return nil
	})
	if next != "" {
		next = base64.RawURLEncoding.EncodeToString(after)
	}
	return items, next, err
}

// mergedReadings walks the readings bucket and a device's staged readings
// together in key order. Keys never repeat across the two (dedup sees both).
type mergedReadings struct {
	c      *bolt.Cursor
	ck, cv []byte
	staged []stagedReading
}

func (m *mergedReadings) seek(k []byte) ([]byte, []byte) {
	m.ck, m.cv = m.c.Seek(k)
	return m.pick()
}

func (m *mergedReadings) next() ([]byte, []byte) { return m.pick() }

// pick returns the smaller head and advances past it.
func (m *mergedReadings) pick() ([]byte, []byte) {
	if len(m.staged) > 0 && (m.ck == nil || bytes.Compare(m.staged[0].key, m.ck) < 0) {
		s := m.staged[0]
		m.staged = m.staged[1:]
		return s.key, s.metrics
	}
	k, v := m.ck, m.cv
	if k != nil {
		m.ck, m.cv = m.c.Next()
	}
	return k, v
}

// EdgeSeq is the highest sequence committed for an edge.
func (f *FSM) EdgeSeq(edge string) uint64 {
	f.mu.RLock()
	v, ok := f.seqs.Load(edge)
	f.mu.RUnlock()
	if ok {
		return v.(uint64)
	}
	var s uint64
	_ = f.view(func(tx *bolt.Tx) error {
		s = getU64(tx.Bucket(bktSeq).Get([]byte(edge)))
		return nil
	})
	return s
}

// Edges lists the edge directory, each entry with the sequence the cloud has
// committed for it. Health is decided by the caller, which owns a clock.
func (f *FSM) Edges() ([]wire.Edge, error) {
	var out []wire.Edge
	err := f.view(func(tx *bolt.Tx) error {
		seq := tx.Bucket(bktSeq)
		return tx.Bucket(bktEdges).ForEach(func(k, v []byte) error {
			var r edgeRecord
			if err := json.Unmarshal(v, &r); err != nil {
				return err
			}
			out = append(out, wire.Edge{ID: r.ID, Region: r.Region, Location: r.Location, Advertise: r.Advertise,
				Backlog: r.Backlog, LastHeartbeatMs: r.LastHeartbeatMs, AckedSeq: getU64(seq.Get(k)),
				OldestUnsynced: r.OldestUnsynced})
			return nil
		})
	})
	return out, err
}

// Nodes lists the cluster members' addresses.
func (f *FSM) Nodes() (map[string]Node, error) {
	out := map[string]Node{}
	err := f.view(func(tx *bolt.Tx) error {
		return tx.Bucket(bktNodes).ForEach(func(k, v []byte) error {
			var n Node
			if err := json.Unmarshal(v, &n); err != nil {
				return err
			}
			out[n.ID] = n
			return nil
		})
	})
	return out, err
}

// GetUser returns a user's roles.
func (f *FSM) GetUser(openid string) (*wire.User, error) {
	var u wire.User
	err := f.view(func(tx *bolt.Tx) error {
		v := tx.Bucket(bktUsers).Get([]byte(openid))
		if v == nil {
			return fmt.Errorf("user %q: %w", openid, ErrNotFound)
		}
		return json.Unmarshal(v, &u)
	})
	return &u, err
}

// ExportRecord is one merged change in the export stream.
type ExportRecord struct {
	Cursor   string         `json:"cursor"`
	Index    uint64         `json:"index"`
	Edge     string         `json:"edge,omitempty"`
	Kind     string         `json:"kind"`
	Device   string         `json:"device,omitempty"`
	Readings []wire.Reading `json:"readings,omitempty"`
	Doc      shadow.Doc     `json:"doc,omitempty"`
	Meta     *wire.Meta     `json:"meta,omitempty"`
	User     *wire.User     `json:"user,omitempty"`
}

// ParseExportCursor reads "INDEX.N" (resume after change N of entry INDEX);
// "" and "0" start at the beginning.
func ParseExportCursor(s string) (uint64, int, error) {
	if s == "" || s == "0" {
		return 0, -1, nil
	}
	i, n, ok := strings.Cut(s, ".")
	idx, err1 := strconv.ParseUint(i, 10, 64)
	sub := -1
	var err2 error
	if ok {
		sub, err2 = strconv.Atoi(n)
	}
	if err1 != nil || err2 != nil || sub < -1 {
		return 0, 0, fmt.Errorf("%w: export cursor %q (want INDEX or INDEX.N)", ErrBadCursor, s)
	}
	if !ok {
		sub = 1<<31 - 1 // a bare index resumes after that whole entry
	}
	return idx, sub, nil
}

// Export calls emit for up to limit merged changes after cursor, in commit
// order, and returns the cursor to resume from.
func (f *FSM) Export(cursor string, limit int, emit func(*ExportRecord) error) (string, error) {
	idx, sub, err := ParseExportCursor(cursor)
	if err != nil {
		return cursor, err
	}
	next := cursor
	n := 0
	err = f.view(func(tx *bolt.Tx) error {
		if err := checkExportCursor(tx, cursor, idx, sub); err != nil {
			return err
		}
		c := tx.Bucket(bktLog).Cursor()
		for k, v := c.Seek(u64(idx)); k != nil && n < limit; k, v = c.Next() {
			index := getU64(k)
			r := reader{b: v}
			count := int(r.uvarint())
			for j := 0; j < count && r.err == nil; j++ {
				origin := r.string()
				_ = r.varint()
				ch := r.change()
				if r.err != nil {
					return fmt.Errorf("export: entry %d: %w", index, r.err)
				}
				if index == idx && j <= sub {
					continue
				}
				if n == limit {
					return nil
				}
				rec := ExportRecord{Cursor: fmt.Sprintf("%d.%d", index, j), Index: index, Edge: origin, Kind: ch.Kind, Device: ch.Device}
				if ch.Kind == wire.KindReadings {
					rec.Readings = make([]wire.Reading, 0, len(ch.Readings))
					for _, rr := range ch.Readings {
						m, err := DecodeMetrics(rr.Metrics)
						if err != nil {
							return err
						}
						rec.Readings = append(rec.Readings, wire.Reading{TS: rr.TS, ID: rr.ID, Metrics: m})
					}
				} else if ch.Other != nil {
					rec.Doc, rec.Meta, rec.User = ch.Other.Doc, ch.Other.Meta, ch.Other.User
				}
				if err := emit(&rec); err != nil {
					return err
				}
				next = rec.Cursor
				n++
			}
		}
		return nil
	})
	return next, err
}

// DeviceIDs lists device ids after cursor (exclusive), for admin tooling.
func (f *FSM) DeviceIDs(after string, limit int) ([]string, error) {
	var out []string
	err := f.view(func(tx *bolt.Tx) error {
		c := tx.Bucket(bktDevices).Cursor()
		k, _ := c.Seek([]byte(after))
		if k != nil && string(k) == after {
			k, _ = c.Next()
		}
		for ; k != nil && len(out) < limit; k, _ = c.Next() {
			out = append(out, string(k))
		}
		return nil
	})
	sort.Strings(out)
	return out, err
}

// Policies returns the policy modules distributed to edges, by name.
func (f *FSM) Policies() ([]wire.Policy, error) {
	var out []wire.Policy
	err := f.view(func(tx *bolt.Tx) error {
		return tx.Bucket(bktPolicies).ForEach(func(k, v []byte) error {
			out = append(out, wire.Policy{Name: string(k), Rego: string(v)})
			return nil
		})
	})
	return out, err
}

// SigningKey returns the deployment's signing key, or ErrNotFound before a
// leader created one.
func (f *FSM) SigningKey() (*SigningKey, error) {
	var k SigningKey
	err := f.view(func(tx *bolt.Tx) error {
		v := tx.Bucket(bktMeta).Get(keySignKey)
		if v == nil {
			return fmt.Errorf("signing key: %w", ErrNotFound)
		}
		return json.Unmarshal(v, &k)
	})
	if err != nil {
		return nil, err
	}
	return &k, nil
}

// Edge is one edge's directory record, with the sequence the cloud has
// committed for it. ErrNotFound: the edge never sent a heartbeat.
func (f *FSM) Edge(id string) (wire.Edge, error) {
	var out wire.Edge
	err := f.view(func(tx *bolt.Tx) error {
		v := tx.Bucket(bktEdges).Get([]byte(id))
		if v == nil {
			return fmt.Errorf("edge %q: %w", id, ErrNotFound)
		}
		var r edgeRecord
		if err := json.Unmarshal(v, &r); err != nil {
			return err
		}
		out = wire.Edge{ID: r.ID, Region: r.Region, Location: r.Location, Advertise: r.Advertise,
			Backlog: r.Backlog, LastHeartbeatMs: r.LastHeartbeatMs, AckedSeq: getU64(tx.Bucket(bktSeq).Get([]byte(id))),
			OldestUnsynced: r.OldestUnsynced}
		return nil
	})
	return out, err
}
