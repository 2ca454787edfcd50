package store

import (
	"encoding/binary"
	"fmt"
	"os"
	"testing"
)

// TestFreelistIsNotWritten checks that commits leave bbolt's free list out
// of the file (NoFreelistSync: the meta page's freelist is pgidNoFreelist),
// and that the list rebuilt at Open is exact: after deleting readings and
// reopening, writing as much again reuses the freed pages instead of
// growing the file, and everything stored reads back.
func TestFreelistIsNotWritten(t *testing.T) {
	s := openTestStore(t, "", Options{})
	batch := func(dev string, base int64) Item {
		rs := make([]Reading, 2000)
		for i := range rs {
			rs[i] = reading(base+int64(i)*1000, fmt.Sprintf("r%d", i), "temp", float64(i))
		}
		return item(dev, rs...)
	}
	for i := range 20 {
		mustIngest(t, s, batch(fmt.Sprintf("d%d", i), t0))
	}
	if fl := metaFreelist(t, s.Path()); fl != ^uint64(0) {
		t.Fatalf("meta freelist page = %d, want none (%d): the free list is written per commit", fl, ^uint64(0))
	}
	// Free most of the file (the cloud has it all), reopen (the list is
	// rebuilt by a scan), and fill it again: the rebuilt list must offer
	// the freed pages.
	if err := s.AckOutbox(s.Counts().OutboxHead); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Prune(t.Context(), t0+2000*1000); err != nil {
		t.Fatal(err)
	}
	s = reopen(t, s)
	before := fileSize(t, s.Path())
	for i := range 20 {
		mustIngest(t, s, batch(fmt.Sprintf("e%d", i), t0+3000*1000))
	}
	if after := fileSize(t, s.Path()); after > before+before/10 {
		t.Errorf("file grew from %d to %d bytes refilling freed space: the rebuilt free list lost pages", before, after)
	}
	if got := allReadings(t, s, "e7", ReadingsQuery{}); len(got) != 2000 {
		t.Errorf("e7 has %d readings after reopen, want 2000", len(got))
	}
	if got := allReadings(t, s, "d7", ReadingsQuery{}); len(got) != 0 {
		t.Errorf("d7 has %d readings after the prune, want 0", len(got))
	}
}

// metaFreelist reads the freelist page id of the file's current meta page
// (the one with the higher txid), from bbolt's on-disk layout: a 16-byte
// page header, then magic, version, page size, flags (4 bytes each), the
// root bucket (16), then freelist, high-water pgid and txid (8 each).
func metaFreelist(t *testing.T, path string) uint64 {
	t.Helper()
	f, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	le := binary.LittleEndian
	pageSize := int(le.Uint32(f[16+8:]))
	var fl, txid uint64
	for _, off := range []int{0, pageSize} {
		m := f[off+16:]
		if id := le.Uint64(m[48:]); id >= txid {
			txid, fl = id, le.Uint64(m[32:])
		}
	}
	return fl
}

func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}
