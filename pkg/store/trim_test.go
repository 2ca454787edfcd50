package store

import (
	"encoding/binary"
	"path/filepath"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// TestDeleteThrough: the outbox trim deletes the keys through the bound in
// chunks of at most limit, says whether eligible keys remain, names the
// last one deleted, and keeps everything past the bound.
func TestDeleteThrough(t *testing.T) {
	db, err := bolt.Open(filepath.Join(t.TempDir(), "t.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	key := func(n uint64) []byte { return binary.BigEndian.AppendUint64(nil, n) }
	if err := db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucket([]byte("b"))
		for n := uint64(1); n <= 25 && err == nil; n++ {
			err = b.Put(append(key(n), 'x'), []byte("v"))
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		bound      uint64
		limit      int
		done       bool
		last       uint64
		firstAfter uint64 // the bucket's first key after the call; 0: empty
	}{
		{20, 7, false, 7, 8},
		{20, 7, false, 14, 15},
		{20, 7, true, 20, 21},
		{20, 7, true, 0, 21}, // nothing left through the bound
		{22, 2, true, 22, 23},
		{100, -1, true, 25, 0},
	} {
		if err := db.Update(func(tx *bolt.Tx) error {
			b := tx.Bucket([]byte("b"))
			done, last, err := deleteThrough(b, tc.bound, tc.limit)
			if err != nil {
				return err
			}
			var first uint64
			if k, _ := b.Cursor().First(); k != nil {
				first = binary.BigEndian.Uint64(k)
			}
			if done != tc.done || last != tc.last || first != tc.firstAfter {
				t.Errorf("through %d, limit %d: done %v last %d first after %d; want %v %d %d",
					tc.bound, tc.limit, done, last, first, tc.done, tc.last, tc.firstAfter)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
}
