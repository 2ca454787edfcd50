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
	bucketAlertIdx  = []byte("alert_index") // state 0 id → nil (ids begin "device~")
	bucketAlertOut  = []byte("alert_out")   // alert id → rules.Alert JSON: the alert outbox

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
		return tx.Bucket(bucketRuleState).ForEach(func(_, v []byte) error {
			var st rules.State
			if err := json.Unmarshal(v, &st); err != nil {
				return fmt.Errorf("decode rule state: %w", err)
			}
			out = append(out, st)
			return nil
		})
	})
	return seq, out, err
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
	if ev.Ended() {
		if err := tx.Bucket(bucketRuleState).Delete(sk); err != nil {
			return err
		}
	} else {
		v, err := json.Marshal(ev.State)
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

// putAlert stores a and moves its index entry to its state.
func putAlert(tx *bolt.Tx, a *rules.Alert) error {
	b := tx.Bucket(bucketAlerts)
	if old := b.Get([]byte(a.ID)); old != nil {
		var prev rules.Alert
		if err := json.Unmarshal(old, &prev); err == nil && prev.State != a.State {
			if err := tx.Bucket(bucketAlertIdx).Delete(alertIdxKey(prev.State, prev.ID)); err != nil {
				return err
			}
		}
	}
	v, err := json.Marshal(a)
	if err != nil {
		return err
	}
	if err := b.Put([]byte(a.ID), v); err != nil {
		return err
	}
	if err := tx.Bucket(bucketAlertOut).Put([]byte(a.ID), v); err != nil {
		return err
	}
	return tx.Bucket(bucketAlertIdx).Put(alertIdxKey(a.State, a.ID), nil)
}

// The alert outbox. Every stored transition of an alert (firing, ack,
// clear, a merged copy) puts the alert's whole new value in alert_out, in
// the transaction that stored it, until the cloud has taken it. It needs
// no sequence: an alert's copies merge as a semilattice (rules.Alert.Merge),
// so only its latest value need travel, in any order, any number of times,
// and a transition made while the cloud is away replaces the one before.
// It is kept apart from the sequenced outbox so a cloud that does not take
// alerts (an older release) leaves them queued instead of blocking the
// stream of readings behind them.

// PendingAlerts returns up to max alerts waiting for the cloud, by id.
func (s *Store) PendingAlerts(max int) ([]rules.Alert, error) {
	var out []rules.Alert
	err := s.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketAlertOut).Cursor()
		for k, v := c.First(); k != nil && len(out) < max; k, v = c.Next() {
			var a rules.Alert
			if err := json.Unmarshal(v, &a); err != nil {
				return fmt.Errorf("decode pending alert %s: %w", k, err)
			}
			out = append(out, a)
		}
		return nil
	})
	return out, err
}

// AlertsSent removes from the alert outbox the alerts the cloud took,
// unless a later transition replaced one meanwhile (it is sent next).
func (s *Store) AlertsSent(sent []rules.Alert) error {
	return s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketAlertOut)
		for i := range sent {
			v := b.Get([]byte(sent[i].ID))
			if v == nil {
				continue
			}
			var cur rules.Alert
			if err := json.Unmarshal(v, &cur); err != nil || cur != sent[i] {
				continue
			}
			if err := b.Delete([]byte(sent[i].ID)); err != nil {
				return err
			}
		}
		return nil
	})
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
// device, and alert_index (state, id) the index by state and device.
func (s *Store) Alerts(q AlertsQuery) ([]rules.Alert, error) {
	out := []rules.Alert{}
	err := s.db.View(func(tx *bolt.Tx) error {
		ab := tx.Bucket(bucketAlerts)
		c := ab.Cursor()
		var head []byte // what precedes the id in a key
		if q.State != "" {
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
			if q.State != "" {
				if v = ab.Get(id); v == nil {
					return errors.New("alert index names a missing alert")
				}
			}
			var a rules.Alert
			if err := json.Unmarshal(v, &a); err != nil {
				return fmt.Errorf("decode alert %s: %w", id, err)
			}
			out = append(out, a)
		}
		return nil
	})
	return out, err
}
