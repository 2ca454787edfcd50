package store

import (
	"encoding/json"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/shadow"
)

// SetDesired merges a desired-state patch (null values delete fields) into a
// device's desired state, creating the device if it is unknown
// (pre-provisioning), and queues the change for sync. It returns the device
// after the write. It is SetDesiredBy without an actor: a change the cloud
// refuses (and corrects) under edge restriction.
func (s *Store) SetDesired(id string, patch map[string]json.RawMessage) (*Device, error) {
	return s.SetDesiredBy(id, patch, Actor{})
}

// SetDesiredBy is SetDesired made by the user by, whose proof is queued
// with the change.
func (s *Store) SetDesiredBy(id string, patch map[string]json.RawMessage, by Actor) (*Device, error) {
	var out *Device
	err := s.update(func(tx *bolt.Tx, head *uint64, created *uint64) error {
		d, err := s.deviceOrNew(tx, id, created)
		if err != nil {
			return err
		}
		delta := shadow.Patch(patch, s.clock.Now())
		d.Desired.Merge(delta)
		c := Change{Kind: ChangeDesired, Device: id, Stamp: delta.Version(), Doc: delta, By: by}
		if err := s.appendOutbox(tx, head, &c); err != nil {
			return err
		}
		out = d
		return putDevice(tx, d)
	})
	if err != nil {
		return nil, fmt.Errorf("set desired state of %s: %w", id, err)
	}
	return out, nil
}

// SetMeta replaces a device's owners, region and tags (SetMetaBy without an
// actor).
func (s *Store) SetMeta(id string, meta DeviceMeta) (*Device, error) {
	return s.SetMetaBy(id, meta, Actor{})
}

// SetMetaBy is SetMeta made by the user by.
func (s *Store) SetMetaBy(id string, meta DeviceMeta, by Actor) (*Device, error) {
	var out *Device
	err := s.update(func(tx *bolt.Tx, head *uint64, created *uint64) error {
		d, err := s.deviceOrNew(tx, id, created)
		if err != nil {
			return err
		}
		if meta.Owners == nil {
			meta.Owners = []string{}
		}
		if meta.Tags == nil {
			meta.Tags = map[string]string{}
		}
		meta.Stamp = s.clock.Now()
		d.Meta = meta
		c := Change{Kind: ChangeMeta, Device: id, Stamp: meta.Stamp, Meta: &meta, By: by}
		if err := s.appendOutbox(tx, head, &c); err != nil {
			return err
		}
		out = d
		return putDevice(tx, d)
	})
	if err != nil {
		return nil, fmt.Errorf("set meta of %s: %w", id, err)
	}
	return out, nil
}

// deviceOrNew loads a device for an administrative write, registering it if
// unknown (pre-provisioning: it has never been seen, so LastSeen stays 0).
func (s *Store) deviceOrNew(tx *bolt.Tx, id string, created *uint64) (*Device, error) {
	d, err := getDevice(tx, id)
	if err == ErrNotFound {
		d = s.newDevice(id, time.Now().UnixMilli())
		d.LastSeen = 0
		*created++
		return d, nil
	}
	return d, err
}

// update runs fn in a write transaction with the outbox head loaded, and
// persists the head and the clock afterwards.
func (s *Store) update(fn func(tx *bolt.Tx, head *uint64, created *uint64) error) error {
	var head, created uint64
	err := s.db.Update(func(tx *bolt.Tx) error {
		head = getU64(tx.Bucket(bucketMeta).Get(keyOutboxHead))
		created = 0
		if err := fn(tx, &head, &created); err != nil {
			return err
		}
		return s.commitMeta(tx, head, 0, created)
	})
	if err != nil {
		return err
	}
	storeMax(&s.outboxHead, head)
	s.devices.Add(created)
	return nil
}

// User is a user's authorisation data. It has wire.User's fields in order,
// so it converts to it for last-writer-wins.
type User struct {
	OpenID  string        `json:"openid"`
	Roles   []string      `json:"roles"`
	Regions []string      `json:"regions"`
	Stamp   hlc.Timestamp `json:"stamp"`
}

// PutUser stores a user's roles and regions and queues the change for sync
// (PutUserBy without an actor). The cloud refuses user changes from edges
// whoever made them, and its correction returns the user to the cloud's
// record: roles are granted at the cloud.
func (s *Store) PutUser(u User) error { return s.PutUserBy(u, Actor{}) }

// PutUserBy is PutUser made by the user by.
func (s *Store) PutUserBy(u User, by Actor) error {
	err := s.update(func(tx *bolt.Tx, head *uint64, _ *uint64) error {
		u.Stamp = s.clock.Now()
		v, err := json.Marshal(u)
		if err != nil {
			return err
		}
		if err := tx.Bucket(bucketUsers).Put([]byte(u.OpenID), v); err != nil {
			return err
		}
		c := Change{Kind: ChangeUser, Device: u.OpenID, Stamp: u.Stamp, User: &u, By: by}
		return s.appendOutbox(tx, head, &c)
	})
	if err != nil {
		return fmt.Errorf("put user %s: %w", u.OpenID, err)
	}
	return nil
}

// User returns a user's roles, or ErrNotFound.
func (s *Store) User(openid string) (*User, error) {
	var u *User
	err := s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketUsers).Get([]byte(openid))
		if v == nil {
			return ErrNotFound
		}
		u = new(User)
		return json.Unmarshal(v, u)
	})
	return u, err
}
