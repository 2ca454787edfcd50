package store

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/lww"
	"github.com/outpost-edge/outpost/pkg/shadow"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// PendingState returns up to max state changes (reported, desired, meta,
// user) still in the outbox with a sequence after after, in order. The
// syncer sends them ahead of the reading backlog ("state before history");
// they stay in the sequenced outbox too, where their second application at
// the cloud is a no-op because every state change is a last-writer-wins
// delta.
func (s *Store) PendingState(after uint64, max int) ([]Change, error) {
	var out []Change
	err := s.db.View(func(tx *bolt.Tx) error {
		ob := tx.Bucket(bucketOutbox)
		c := tx.Bucket(bucketStateIdx).Cursor()
		for k, _ := c.Seek(u64(after + 1)); k != nil && len(out) < max; k, _ = c.Next() {
			seq := binary.BigEndian.Uint64(k)
			v := ob.Get(k)
			if v == nil {
				continue // acked concurrently
			}
			ch, err := decodeChange(seq, v)
			if err != nil {
				return fmt.Errorf("decode outbox entry %d: %w", seq, err)
			}
			out = append(out, ch)
		}
		return nil
	})
	return out, err
}

// SyncValue returns a value the syncer stored under key, nil if none.
func (s *Store) SyncValue(key string) ([]byte, error) {
	var out []byte
	err := s.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucketSync).Get([]byte(key)); v != nil {
			out = append([]byte(nil), v...)
		}
		return nil
	})
	return out, err
}

// SetSyncValues stores the syncer's cursors and caches in one transaction.
func (s *Store) SetSyncValues(kv map[string][]byte) error {
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketSync)
		for k, v := range kv {
			if err := b.Put([]byte(k), v); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("store sync state: %w", err)
	}
	return nil
}

// Applied is what ApplyRemote did with one change.
type Applied struct {
	Change  Change
	Device  *Device // the device after the change (nil for users)
	Changed bool    // something in the local state changed
	// Rejected counts fields (or whole meta/user records) whose stamp was
	// further ahead than the clock's maximum drift.
	Rejected int
}

// ApplyRemote merges changes that came from the cloud into the local state
// with the same per-field last-writer-wins merge local writes use, in one
// transaction. It appends nothing to the outbox: a pulled change is not a
// local change, so it must not echo back. Stamps beyond the clock's drift
// bound are rejected (counted, not applied); accepted ones advance the
// clock so later local writes are stamped after them.
func (s *Store) ApplyRemote(changes []Change) ([]Applied, error) {
	out := make([]Applied, 0, len(changes))
	var created uint64
	err := s.db.Update(func(tx *bolt.Tx) error {
		out, created = out[:0], 0
		for _, c := range changes {
			a := Applied{Change: c}
			if c.Kind == ChangeUser {
				if c.User == nil {
					continue
				}
				if err := s.applyRemoteUser(tx, &a, *c.User); err != nil {
					return err
				}
				out = append(out, a)
				continue
			}
			d, err := getDevice(tx, c.Device)
			isNew := false
			if errors.Is(err, ErrNotFound) {
				d = s.newDevice(c.Device, time.Now().UnixMilli())
				d.LastSeen = 0
				isNew = true
			} else if err != nil {
				return err
			}
			if d.Desired == nil {
				d.Desired = shadow.Doc{}
			}
			if d.Reported == nil {
				d.Reported = shadow.Doc{}
			}
			switch c.Kind {
			case ChangeDesired, ChangeReported:
				doc := shadow.Doc{}
				for k, f := range c.Doc {
					if _, err := s.clock.Update(f.Stamp); err != nil {
						if errors.Is(err, hlc.ErrDrift) {
							a.Rejected++
							continue
						}
						return err
					}
					doc[k] = f
				}
				target := d.Desired
				if c.Kind == ChangeReported {
					target = d.Reported
				}
				a.Changed = len(target.Merge(doc)) > 0
			case ChangeMeta:
				if c.Meta == nil {
					continue
				}
				m := *c.Meta
				if m.Owners == nil {
					m.Owners = []string{}
				}
				if m.Tags == nil {
					m.Tags = map[string]string{}
				}
				if _, err := s.clock.Update(m.Stamp); err != nil {
					if !errors.Is(err, hlc.ErrDrift) {
						return err
					}
					a.Rejected++
				} else if metaWins(&m, &d.Meta) {
					d.Meta, a.Changed = m, true
				}
			default:
				continue
			}
			if a.Changed {
				if err := putDevice(tx, d); err != nil {
					return err
				}
				if isNew {
					created++ // pre-provisioned from the cloud
				}
			}
			a.Device = d
			out = append(out, a)
		}
		m := tx.Bucket(bucketMeta)
		if err := m.Put(keyHLC, u64(uint64(s.clock.Last()))); err != nil {
			return err
		}
		if created > 0 {
			return m.Put(keyDevices, u64(getU64(m.Get(keyDevices))+created))
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("apply %d remote changes: %w", len(changes), err)
	}
	s.devices.Add(created)
	return out, nil
}

// metaWins is last-writer-wins for whole meta records, in the order the
// cloud uses too (pkg/lww over wire.Meta's canonical encoding).
func metaWins(a, b *DeviceMeta) bool { return lww.Wins(wire.Meta(*a), wire.Meta(*b)) }

func (s *Store) applyRemoteUser(tx *bolt.Tx, a *Applied, u User) error {
	if _, err := s.clock.Update(u.Stamp); err != nil {
		if errors.Is(err, hlc.ErrDrift) {
			a.Rejected++
			return nil
		}
		return err
	}
	if u.Roles == nil {
		u.Roles = []string{}
	}
	if u.Regions == nil {
		u.Regions = []string{}
	}
	b := tx.Bucket(bucketUsers)
	if v := b.Get([]byte(u.OpenID)); v != nil {
		var cur User
		if err := json.Unmarshal(v, &cur); err != nil {
			return fmt.Errorf("decode user %s: %w", u.OpenID, err)
		}
		if !lww.Wins(wire.User(u), wire.User(cur)) {
			return nil // older, the same write again, or the loser of a tie
		}
	}
	v, err := json.Marshal(u)
	if err != nil {
		return err
	}
	a.Changed = true
	return b.Put([]byte(u.OpenID), v)
}
