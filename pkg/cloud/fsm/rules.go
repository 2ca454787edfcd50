package fsm

import (
	"encoding/json"
	"fmt"

	bolt "go.etcd.io/bbolt"
)

// Rules distributed to edges. The service compiles a rule (pkg/rules)
// before proposing it, so the state machine stores what it is given: the
// rule's JSON and the region it is limited to ("" for every edge).
//
// bucket rules: rule name → JSON RuleRecord.

// CmdRulePut stores or (with an empty Rule) deletes a distributed rule.
const CmdRulePut CmdType = 18

var bktRules = []byte("rules")

// RuleCmd is CmdRulePut's payload.
type RuleCmd struct {
	Name   string          `json:"name"`
	Region string          `json:"region,omitempty"`
	Rule   json.RawMessage `json:"rule,omitempty"`
}

// RuleRecord is a stored rule.
type RuleRecord struct {
	Name   string          `json:"name"`
	Region string          `json:"region,omitempty"`
	Rule   json.RawMessage `json:"rule"`
	// Index is the raft index of the write: the rule set's version moves
	// with it.
	Index uint64 `json:"index"`
}

const maxRuleName = 64

func (a *applier) rulePut(index uint64, c *RuleCmd) (Result, error) {
	if c == nil || c.Name == "" || len(c.Name) > maxRuleName {
		return Result{Err: fmt.Errorf("%w: rule command without a valid name", ErrCorrupt)}, nil
	}
	b, err := a.tx.CreateBucketIfNotExists(bktRules)
	if err != nil {
		return Result{}, err
	}
	// Rules are a set pulls carry: SetsIndex moves and held pulls wake.
	a.setsChanged = true
	if len(c.Rule) == 0 {
		if b.Get([]byte(c.Name)) == nil {
			return Result{}, nil
		}
		return Result{Applied: 1}, b.Delete([]byte(c.Name))
	}
	return Result{Applied: 1}, putJSON(b, c.Name, RuleRecord{Name: c.Name, Region: c.Region, Rule: c.Rule, Index: index})
}

// Rules returns the distributed rules, by name.
func (f *FSM) Rules() ([]RuleRecord, error) {
	var out []RuleRecord
	err := f.view(func(tx *bolt.Tx) error {
		b := tx.Bucket(bktRules)
		if b == nil {
			return nil
		}
		return b.ForEach(func(_, v []byte) error {
			var r RuleRecord
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("%w: rule record: %v", ErrCorrupt, err)
			}
			out = append(out, r)
			return nil
		})
	})
	return out, err
}
