package fsm

import (
	"encoding/binary"
	"fmt"

	bolt "go.etcd.io/bbolt"
)

// Export sinks' positions. Each configured sink (NATS JetStream, Kafka; see
// package sinks) has a replicated cursor: the raft index up to which,
// inclusive, the sink has taken every export record. The leader's publisher
// advances it in batches with CmdSinkCursor, a new leader resumes from it,
// and log retention keeps every entry above the lowest one.
//
// bucket sink_cursor: sink name → raft index (8 bytes, big-endian). That
// format is read by retention too: keep it.

// CmdSinkCursor records how far a sink has taken the export log.
const CmdSinkCursor CmdType = 16

// SinkCursorCmd is CmdSinkCursor's payload: Sink has taken every export
// record of the entries at or below Index; or, with Remove, the sink is
// gone from the configuration and its cursor (which holds log retention
// back) is dropped.
type SinkCursorCmd struct {
	Sink   string `json:"sink"`
	Index  uint64 `json:"index"`
	Remove bool   `json:"remove,omitempty"`
}

// maxSinkName bounds a sink name (a bbolt key); config validation allows
// far less.
const maxSinkName = 256

// sinkCursor stores c's position. A cursor only moves forward: a proposal
// from a deposed leader that commits after its successor's cannot take a
// sink back (that would only re-send, but retention may already have
// dropped what it names). A cursor at 0 registers the sink, so retention
// keeps the log for it before it has taken anything.
func (a *applier) sinkCursor(c *SinkCursorCmd) (Result, error) {
	if c == nil || c.Sink == "" || len(c.Sink) > maxSinkName {
		return Result{Err: fmt.Errorf("%w: sink cursor without a valid sink name", ErrCorrupt)}, nil
	}
	b, err := a.tx.CreateBucketIfNotExists(bktSinkCursor)
	if err != nil {
		return Result{}, err
	}
	if c.Remove {
		if b.Get([]byte(c.Sink)) == nil {
			return Result{}, nil
		}
		return Result{Applied: 1}, b.Delete([]byte(c.Sink))
	}
	if v := b.Get([]byte(c.Sink)); v != nil && getU64(v) >= c.Index {
		return Result{}, nil
	}
	return Result{Applied: 1}, b.Put([]byte(c.Sink), u64(c.Index))
}

// SinkCursor is how far sink has taken the export log (see CmdSinkCursor);
// ok is false for a sink that never recorded a position.
func (f *FSM) SinkCursor(sink string) (index uint64, ok bool, err error) {
	err = f.view(func(tx *bolt.Tx) error {
		if b := tx.Bucket(bktSinkCursor); b != nil {
			if v := b.Get([]byte(sink)); v != nil {
				index, ok = getU64(v), true
			}
		}
		return nil
	})
	return index, ok, err
}

// SinkCursors is every recorded sink position, by sink name.
func (f *FSM) SinkCursors() (map[string]uint64, error) {
	out := map[string]uint64{}
	err := f.view(func(tx *bolt.Tx) error {
		b := tx.Bucket(bktSinkCursor)
		if b == nil {
			return nil
		}
		return b.ForEach(func(k, v []byte) error {
			out[string(k)] = getU64(v)
			return nil
		})
	})
	return out, err
}

// ExportBehind counts the export log after index: the entries holding
// merged changes and the export records in them, looking at no more than
// maxEntries entries (complete is false when it stopped there). A sink's
// lag is ExportBehind(its cursor).
func (f *FSM) ExportBehind(index uint64, maxEntries int) (entries, records int, complete bool, err error) {
	err = f.view(func(tx *bolt.Tx) error {
		c := tx.Bucket(bktLog).Cursor()
		k, v := c.Seek(u64(index + 1))
		for ; k != nil && entries < maxEntries; k, v = c.Next() {
			n, _ := binary.Uvarint(v)
			entries++
			records += int(n)
		}
		complete = k == nil
		return nil
	})
	return entries, records, complete, err
}
