package store

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"

	bolt "go.etcd.io/bbolt"

	"github.com/outpost-edge/outpost/pkg/rules"
)

// The rule runner's state: the edge's own rules, the engine's per-rule
// per-device states, the alerts with an index by device and state, and the
// runner's position in the outbox (meta rules_seq). Saved in one
// transaction per batch of evaluated readings, so after a crash the runner
// resumes from a position that matches its states exactly.
var (
	bucketRules     = []byte("rules")       // name → rules.Rule JSON (edge-local rules)
	bucketRuleState = []byte("rule_state")  // rule 0 device → rules.State JSON
	bucketAlerts    = []byte("alerts")      // alert id → rules.Alert JSON
	bucketAlertIdx  = []byte("alert_index") // state 0 id → nil, open alerts only (ids begin "device~")
	bucketAlertQ    = []byte("alert_queue") // 8-byte sequence → alert id: the alert outbox
	legacyAlertOut  = []byte("alert_out")   // alert id → rules.Alert JSON: the alert outbox until this release (migrateAlertOut)

	keyRulesSeq = []byte("rules_seq")
)

// LocalRules is the edge's own rules, by name.
func (s *Store) LocalRules() ([]rules.Rule, error) {
	var out []rules.Rule
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketRules).ForEach(func(_, v []byte) error {
			var r rules.Rule
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("decode rule: %w", err)
			}
			out = append(out, r)
			return nil
		})
	})
	return out, err
}

// PutLocalRule stores (or replaces) an edge-local rule. The caller has
// compiled it.
func (s *Store) PutLocalRule(r rules.Rule) error {
	v, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketRules).Put([]byte(r.Name), v) })
}

// DeleteLocalRule removes an edge-local rule; ErrNotFound if there is none.
func (s *Store) DeleteLocalRule(name string) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketRules)
		if b.Get([]byte(name)) == nil {
			return ErrNotFound
		}
		return b.Delete([]byte(name))
	})
}

// RuleStates is where the rule runner resumes: its outbox position and the
// engine states saved with it.
func (s *Store) RuleStates() (uint64, []rules.State, error) {
	var seq uint64
	var out []rules.State
	err := s.db.View(func(tx *bolt.Tx) error {
		seq = getU64(tx.Bucket(bucketMeta).Get(keyRulesSeq))
		ab := tx.Bucket(bucketAlerts)
		return tx.Bucket(bucketRuleState).ForEach(func(_, v []byte) error {
			st, err := decodeRuleState(ab, v)
			if err != nil {
				return err
			}
			out = append(out, st)
			return nil
		})
	})
	return seq, out, err
}

// storedState is a rules.State as rule_state holds it: an open alert by
// its id, its value being the alerts bucket's (both are written in the
// same transaction, and every later transition of an open alert is an
// event that rewrites the alert). A copy of the alert in every state made
// the bucket ten times larger, so a commit's transitions dirtied a page
// each. Values of older releases hold the copy (Alert) and still read.
type storedState struct {
	rules.Key
	Version      string       `json:"version"`
	PendingSince int64        `json:"pending_since,omitempty"`
	AlertID      string       `json:"alert_id,omitempty"`
	Alert        *rules.Alert `json:"alert,omitempty"` // older releases
	Value        float64      `json:"value,omitempty"`
}

func encodeRuleState(st rules.State) ([]byte, error) {
	ss := storedState{Key: st.Key, Version: st.Version, PendingSince: st.PendingSince, Value: st.Value}
	if st.Alert != nil {
		ss.AlertID = st.Alert.ID
	}
	return json.Marshal(ss)
}

func decodeRuleState(alerts *bolt.Bucket, v []byte) (rules.State, error) {
	var ss storedState
	if err := json.Unmarshal(v, &ss); err != nil {
		return rules.State{}, fmt.Errorf("decode rule state: %w", err)
	}
	st := rules.State{Key: ss.Key, Version: ss.Version, PendingSince: ss.PendingSince, Alert: ss.Alert, Value: ss.Value}
	id := ss.AlertID
	if id == "" && ss.Alert != nil {
		// An older release's copy: the alerts bucket's value is the same or,
		// after an ack this release stored without rewriting the state,
		// later.
		id = ss.Alert.ID
	}
	if id == "" {
		return st, nil
	}
	raw := alerts.Get([]byte(id))
	if raw == nil {
		if ss.Alert != nil {
			return st, nil
		}
		return rules.State{}, fmt.Errorf("rule state %s/%s names a missing alert %s: %w", ss.Rule, ss.Device, id, errCorrupt)
	}
	var a rules.Alert
	if err := json.Unmarshal(raw, &a); err != nil {
		return rules.State{}, fmt.Errorf("decode alert %s: %w", id, err)
	}
	st.Alert = &a
	return st, nil
}

// SaveRuleEvents records what the engine did, in one transaction: each
// event's state (deleted when it ended), each alert it carries, and the
// runner's new outbox position seq (never moved backwards). Outbox entries
// both the cloud and the runner are done with are deleted.
//
// The edge's runner saves through the ingest writer instead, whose commits
// carry its saves (RuleSave); this is the save on its own.
func (s *Store) SaveRuleEvents(seq uint64, evs []rules.Event) error {
	for {
		done := true
		err := s.db.Update(func(tx *bolt.Tx) error {
			var err error
			done, err = s.putRuleSaves(tx, []RuleSave{{Seq: seq, Events: evs}})
			evs = nil // applied: a trim chunk that follows must not repeat them
			return err
		})
		if err != nil {
			return fmt.Errorf("save rule events: %w", err)
		}
		if done {
			s.trimPending.Store(false)
			return nil
		}
	}
}

// RuleSave is one SaveRuleEvents call carried by an ingest commit
// (Ingest's saves): the rule runner's events and its new position.
type RuleSave struct {
	Seq    uint64
	Events []rules.Event
}

// putRuleSaves applies saves, in order, in tx and, when the outbox is held
// for rules, deletes one chunk of what nothing needs any more; done is
// false when more remains to delete.
func (s *Store) putRuleSaves(tx *bolt.Tx, saves []RuleSave) (done bool, err error) {
	m := tx.Bucket(bucketMeta)
	seq := getU64(m.Get(keyRulesSeq))
	moved := false
	for _, sv := range saves {
		for _, ev := range sv.Events {
			if err := putRuleEvent(tx, ev); err != nil {
				return false, err
			}
		}
		if sv.Seq > seq {
			seq, moved = sv.Seq, true
		}
	}
	if moved {
		if err := m.Put(keyRulesSeq, u64(seq)); err != nil {
			return false, err
		}
	}
	if !s.opts.HoldOutboxForRules {
		return true, nil
	}
	return s.trimOutbox(tx)
}

// OutboxTrimPending reports that a commit carrying rule saves left outbox
// entries to delete (it deletes one chunk): a caller that saves again,
// even with nothing new, deletes the next. A hint, for the ingest writer.
func (s *Store) OutboxTrimPending() bool { return s.trimPending.Load() }

func putRuleEvent(tx *bolt.Tx, ev rules.Event) error {
	sk := ruleStateKey(ev.State.Key)
	switch {
	case ev.Ended():
		if err := tx.Bucket(bucketRuleState).Delete(sk); err != nil {
			return err
		}
	case ev.Kind == rules.Changed && ev.Alert != nil && ev.State.Alert != nil && ev.State.Alert.ID == ev.Alert.ID:
		// The open alert changed, not the state, which names it by id.
	default:
		v, err := encodeRuleState(ev.State)
		if err != nil {
			return err
		}
		if err := tx.Bucket(bucketRuleState).Put(sk, v); err != nil {
			return err
		}
	}
	if ev.Alert == nil {
		return nil
	}
	return putAlert(tx, ev.Alert)
}

// putAlert stores a, moves its index entry to its state, and queues it
// for the cloud.
func putAlert(tx *bolt.Tx, a *rules.Alert) error {
	b := tx.Bucket(bucketAlerts)
	// The entry of the state it left, whichever: deleting a key that is
	// not there changes no page, and costs less than decoding the stored
	// alert to learn its state.
	idx := tx.Bucket(bucketAlertIdx)
	for _, st := range [...]string{rules.StateActive, rules.StateAcknowledged} {
		if st == a.State {
			continue
		}
		if err := idx.Delete(alertIdxKey(st, a.ID)); err != nil {
			return err
		}
	}
	v, err := json.Marshal(a)
	if err != nil {
		return err
	}
	if err := b.Put([]byte(a.ID), v); err != nil {
		return err
	}
	if err := queueAlert(tx, a.ID); err != nil {
		return err
	}
	if !indexed(a.State) {
		return nil
	}
	return idx.Put(alertIdxKey(a.State, a.ID), nil)
}

// indexed reports whether alert_index holds the alerts in state: the open
// ones, at most one per rule and device. Cleared alerts are nearly all of
// them: their query filters the alerts bucket, which skips no more than
// the open ones, and a clear then writes no index page of its own (a
// commit's clears each dirtied one, spread over the devices).
func indexed(state string) bool {
	return state == rules.StateActive || state == rules.StateAcknowledged
}

// dropClearedIndex deletes the index entries of cleared alerts that older
// releases kept, in transactions of at most limit deletions. Nothing reads
// them any more, so a crash part of the way costs nothing: the next Open
// continues.
func dropClearedIndex(db *bolt.DB, limit int) error {
	prefix := alertIdxKey(rules.StateCleared, "")
	for {
		var keys [][]byte
		if err := db.View(func(tx *bolt.Tx) error {
			b := tx.Bucket(bucketAlertIdx)
			if b == nil {
				return nil
			}
			c := b.Cursor()
			for k, _ := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix) && len(keys) < limit; k, _ = c.Next() {
				keys = append(keys, bytes.Clone(k))
			}
			return nil
		}); err != nil {
			return err
		}
		if len(keys) == 0 {
			return nil
		}
		if err := db.Update(func(tx *bolt.Tx) error {
			b := tx.Bucket(bucketAlertIdx)
			for _, k := range keys {
				if err := b.Delete(k); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			return fmt.Errorf("drop the index of cleared alerts: %w", err)
		}
	}
}

// The alert outbox. Every stored transition of an alert (firing, ack,
// clear, a merged copy) appends the alert's id to alert_queue, in the
// transaction that stored it, until the cloud has taken the alert's value
// (which is the alerts bucket's: the queue holds no copy). It needs no
// order beyond its own: an alert's copies merge as a semilattice
// (rules.Alert.Merge), so only its latest value need travel, in any order,
// any number of times. The queue is keyed by a sequence so that a commit's
// transitions append to its last page (FillPercent 1) instead of dirtying
// a page per alert, as a queue keyed by alert id did (alert_out, which
// also held a second copy of every value); an alert that changed twice
// while the cloud was away is queued twice and sent once (PendingAlerts
// reads each id once). It is kept apart from the sequenced outbox so a
// cloud that does not take alerts (an older release) leaves them queued
// instead of blocking the stream of readings behind them.

// queueAlert appends id to the alert outbox.
func queueAlert(tx *bolt.Tx, id string) error {
	q := tx.Bucket(bucketAlertQ)
	q.FillPercent = 1 // keys only grow
	n, err := q.NextSequence()
	if err != nil {
		return err
	}
	return q.Put(u64(n), []byte(id))
}

// PendingAlerts returns up to max alerts waiting for the cloud, each once,
// with its latest value, in the order they were first queued.
func (s *Store) PendingAlerts(max int) ([]rules.Alert, error) {
	var out []rules.Alert
	err := s.db.View(func(tx *bolt.Tx) error {
		ab := tx.Bucket(bucketAlerts)
		seen := map[string]bool{}
		c := tx.Bucket(bucketAlertQ).Cursor()
		for k, id := c.First(); k != nil && len(out) < max; k, id = c.Next() {
			if seen[string(id)] {
				continue
			}
			seen[string(id)] = true
			v := ab.Get(id)
			if v == nil {
				continue // never happens: alerts are not deleted; AlertsSent drops the entry
			}
			var a rules.Alert
			if err := json.Unmarshal(v, &a); err != nil {
				return fmt.Errorf("decode pending alert %s: %w", id, err)
			}
			out = append(out, a)
		}
		return nil
	})
	return out, err
}

// AlertsSent removes from the alert outbox the alerts the cloud took,
// unless a later transition changed one meanwhile (it is sent next). It
// walks the queue from its front while the entries name sent alerts,
// which covers what PendingAlerts read: an entry after that is a
// transition queued later, kept unless the alert's value is still the one
// sent.
func (s *Store) AlertsSent(sent []rules.Alert) error {
	if len(sent) == 0 {
		return nil
	}
	byID := make(map[string]rules.Alert, len(sent))
	for _, a := range sent {
		byID[a.ID] = a
	}
	return s.db.Update(func(tx *bolt.Tx) error {
		ab := tx.Bucket(bucketAlerts)
		q := tx.Bucket(bucketAlertQ)
		var drop [][]byte
		c := q.Cursor()
		for k, id := c.First(); k != nil; k, id = c.Next() {
			a, ok := byID[string(id)]
			if !ok {
				if v := ab.Get(id); v == nil {
					drop = append(drop, bytes.Clone(k)) // names no alert: nothing to send
					continue
				}
				break
			}
			v := ab.Get(id)
			var cur rules.Alert
			if v != nil {
				if err := json.Unmarshal(v, &cur); err != nil || cur != a {
					continue
				}
			}
			drop = append(drop, bytes.Clone(k))
		}
		for _, k := range drop {
			if err := q.Delete(k); err != nil {
				return err
			}
		}
		return nil
	})
}

// migrateAlertOut moves the alert outbox of an older release (alert_out:
// alert id → a copy of the alert's value, which is always the alerts
// bucket's: both were written together) into alert_queue, in id order,
// and drops it. One transaction: the outbox holds one entry per alert the
// cloud has not taken.
func migrateAlertOut(db *bolt.DB) error {
	var present bool
	if err := db.View(func(tx *bolt.Tx) error { present = tx.Bucket(legacyAlertOut) != nil; return nil }); err != nil {
		return err
	}
	if !present {
		return nil
	}
	err := db.Update(func(tx *bolt.Tx) error {
		if _, err := tx.CreateBucketIfNotExists(bucketAlertQ); err != nil {
			return err
		}
		ab, err := tx.CreateBucketIfNotExists(bucketAlerts)
		if err != nil {
			return err
		}
		err = tx.Bucket(legacyAlertOut).ForEach(func(id, v []byte) error {
			if ab.Get(id) == nil {
				// Not written by this store's putAlert; keep the value.
				if err := ab.Put(bytes.Clone(id), bytes.Clone(v)); err != nil {
					return err
				}
			}
			return queueAlert(tx, string(id))
		})
		if err != nil {
			return err
		}
		return tx.DeleteBucket(legacyAlertOut)
	})
	if err != nil {
		return fmt.Errorf("migrate %s to %s: %w", legacyAlertOut, bucketAlertQ, err)
	}
	return nil
}

// MergeAlert folds a copy of an alert that is not open in the engine (an
// ack of a cleared alert, a copy from the cloud) into the stored one.
// ErrNotFound if the edge has no such alert.
func (s *Store) MergeAlert(a rules.Alert) (rules.Alert, error) {
	var out rules.Alert
	err := s.db.Update(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketAlerts).Get([]byte(a.ID))
		if v == nil {
			return ErrNotFound
		}
		if err := json.Unmarshal(v, &out); err != nil {
			return fmt.Errorf("decode alert %s: %w", a.ID, err)
		}
		if !out.Merge(a) {
			return nil
		}
		return putAlert(tx, &out)
	})
	return out, err
}

func ruleStateKey(k rules.Key) []byte {
	return append(append([]byte(k.Rule), 0), k.Device...)
}

func alertIdxKey(state, id string) []byte {
	return append(append([]byte(state), 0), id...)
}

// Alert returns one alert.
func (s *Store) Alert(id string) (rules.Alert, error) {
	var a rules.Alert
	err := s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketAlerts).Get([]byte(id))
		if v == nil {
			return ErrNotFound
		}
		return json.Unmarshal(v, &a)
	})
	return a, err
}

// AlertsQuery selects alerts: of one device (or all), in one state (or
// any), after a cursor (the last id of the previous page).
type AlertsQuery struct {
	Device string
	State  string
	After  string
	Limit  int
}

// Alerts lists alerts in id order (device, then rule, then start). Alert
// ids begin with their device, so the alerts bucket is itself the index by
// device, and alert_index (state, id) the index of open alerts by state
// and device; other states filter the alerts bucket (see indexed).
func (s *Store) Alerts(q AlertsQuery) ([]rules.Alert, error) {
	out := []rules.Alert{}
	useIdx := q.State != "" && indexed(q.State)
	err := s.db.View(func(tx *bolt.Tx) error {
		ab := tx.Bucket(bucketAlerts)
		c := ab.Cursor()
		var head []byte // what precedes the id in a key
		if useIdx {
			head = alertIdxKey(q.State, "")
			c = tx.Bucket(bucketAlertIdx).Cursor()
		}
		prefix := append(append([]byte(nil), head...), q.Device...)
		if q.Device != "" {
			prefix = append(prefix, '~')
		}
		seek := prefix
		if q.After != "" {
			seek = append(append([]byte(nil), head...), q.After...)
		}
		strip := len(head)
		for k, v := c.Seek(seek); k != nil && bytes.HasPrefix(k, prefix) && len(out) < q.Limit; k, v = c.Next() {
			id := k[strip:]
			if q.After != "" && string(id) <= q.After {
				continue
			}
			if useIdx {
				if v = ab.Get(id); v == nil {
					return errors.New("alert index names a missing alert")
				}
			}
			var a rules.Alert
			if err := json.Unmarshal(v, &a); err != nil {
				return fmt.Errorf("decode alert %s: %w", id, err)
			}
			if q.State != "" && a.State != q.State {
				continue
			}
			out = append(out, a)
		}
		return nil
	})
	return out, err
}
