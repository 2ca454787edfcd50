package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
)

// Reading is one timestamped set of metric values from a device.
type Reading struct {
	TS      int64    // Unix milliseconds
	ID      string   // optional message id given by the device, used for dedupe
	Metrics []Metric // in the order received; names unique
	// ReceiveTS is set when the device sent no ts and TS is the edge's
	// receive time. A redelivery then gets a different TS, so dedupe by id
	// needs an id index; with a device ts the key itself (ts and a hash of
	// the id) identifies the reading and no index is written.
	ReceiveTS bool
}

// Metric is one named value of a reading.
type Metric struct {
	Name  string
	Value float64
}

var errCorrupt = errors.New("store: corrupt record")

// readingKey orders a device's readings by time; the suffix makes readings
// with equal timestamps distinct and doubles as the dedupe identity: a hash of
// the device's message id when there is one, else of the metrics themselves.
func readingKey(r *Reading, encodedMetrics []byte) [16]byte {
	var k [16]byte
	binary.BigEndian.PutUint64(k[:8], uint64(r.TS))
	var h uint64
	if r.ID != "" {
		h = fnv64a(fnv64a(fnvOffset64, "i"), r.ID)
	} else {
		h = fnv64a(fnv64a(fnvOffset64, "m"), encodedMetrics)
	}
	binary.BigEndian.PutUint64(k[8:], h)
	return k
}

// FNV-1a, 64 bit, as hash/fnv computes it (keys on disk depend on it being
// the same), without hash/fnv's allocations on the ingest path.
const (
	fnvOffset64 = 14695981039346656037
	fnvPrime64  = 1099511628211
)

func fnv64a[T string | []byte](h uint64, b T) uint64 {
	for i := 0; i < len(b); i++ {
		h ^= uint64(b[i])
		h *= fnvPrime64
	}
	return h
}

func keyTS(k []byte) int64 { return int64(binary.BigEndian.Uint64(k[:8])) }

// appendMetrics encodes metrics compactly: count, then name length, name and
// IEEE-754 bits for each.
func appendMetrics(dst []byte, ms []Metric) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(ms)))
	for _, m := range ms {
		dst = binary.AppendUvarint(dst, uint64(len(m.Name)))
		dst = append(dst, m.Name...)
		dst = binary.BigEndian.AppendUint64(dst, math.Float64bits(m.Value))
	}
	return dst
}

func readMetrics(b []byte, into []Metric) ([]Metric, []byte, error) {
	n, w := binary.Uvarint(b)
	if w <= 0 || n > uint64(len(b)) {
		return nil, nil, errCorrupt
	}
	b = b[w:]
	for i := uint64(0); i < n; i++ {
		l, w := binary.Uvarint(b)
		if w <= 0 || l > uint64(len(b)-w) || uint64(len(b)-w)-l < 8 {
			return nil, nil, errCorrupt
		}
		b = b[w:]
		name := string(b[:l])
		v := math.Float64frombits(binary.BigEndian.Uint64(b[l : l+8]))
		into = append(into, Metric{Name: name, Value: v})
		b = b[l+8:]
	}
	return into, b, nil
}

// reading value: outbox seq (uvarint), id (uvarint length + bytes), metrics.
func encodeReadingValue(dst []byte, seq uint64, id string, metrics []byte) []byte {
	dst = binary.AppendUvarint(dst, seq)
	dst = binary.AppendUvarint(dst, uint64(len(id)))
	dst = append(dst, id...)
	return append(dst, metrics...)
}

func decodeReadingValue(key, v []byte) (Reading, uint64, error) {
	r := Reading{TS: keyTS(key)}
	seq, w := binary.Uvarint(v)
	if w <= 0 {
		return r, 0, errCorrupt
	}
	v = v[w:]
	l, w := binary.Uvarint(v)
	if w <= 0 || uint64(len(v)-w) < l {
		return r, 0, errCorrupt
	}
	r.ID = string(v[w : w+int(l)])
	ms, _, err := readMetrics(v[w+int(l):], nil)
	if err != nil {
		return r, 0, err
	}
	r.Metrics = ms
	return r, seq, nil
}

// readingSeq reads the outbox sequence at the start of an encoded reading
// value without decoding the rest; retention uses it to skip unsynced readings.
func readingSeq(v []byte) uint64 {
	seq, _ := binary.Uvarint(v)
	return seq
}

// agg is a rollup cell: count, min, max and sum of one metric over one period.
type agg struct {
	Count         uint64
	Min, Max, Sum float64
}

func (a *agg) add(v float64) {
	if a.Count == 0 || v < a.Min {
		a.Min = v
	}
	if a.Count == 0 || v > a.Max {
		a.Max = v
	}
	a.Count++
	a.Sum += v
}

func (a *agg) merge(b agg) {
	if b.Count == 0 {
		return
	}
	if a.Count == 0 || b.Min < a.Min {
		a.Min = b.Min
	}
	if a.Count == 0 || b.Max > a.Max {
		a.Max = b.Max
	}
	a.Count += b.Count
	a.Sum += b.Sum
}

func (a agg) encode() []byte { return a.append(make([]byte, 0, 32)) }

// append appends the 32-byte encoding of a to dst.
func (a agg) append(dst []byte) []byte {
	dst = binary.BigEndian.AppendUint64(dst, a.Count)
	dst = binary.BigEndian.AppendUint64(dst, math.Float64bits(a.Min))
	dst = binary.BigEndian.AppendUint64(dst, math.Float64bits(a.Max))
	return binary.BigEndian.AppendUint64(dst, math.Float64bits(a.Sum))
}

func decodeAgg(b []byte) (agg, error) {
	if len(b) != 32 {
		return agg{}, fmt.Errorf("%w: rollup cell of %d bytes", errCorrupt, len(b))
	}
	return agg{
		Count: binary.BigEndian.Uint64(b[0:]),
		Min:   math.Float64frombits(binary.BigEndian.Uint64(b[8:])),
		Max:   math.Float64frombits(binary.BigEndian.Uint64(b[16:])),
		Sum:   math.Float64frombits(binary.BigEndian.Uint64(b[24:])),
	}, nil
}

// rollupKey orders cells by metric, then period start, so that one metric's
// range is one contiguous scan.
func rollupKey(metric string, periodStart int64) []byte {
	return appendRollupKey(make([]byte, 0, len(metric)+9), metric, periodStart)
}

func appendRollupKey(dst []byte, metric string, periodStart int64) []byte {
	dst = append(dst, metric...)
	dst = append(dst, 0)
	return binary.BigEndian.AppendUint64(dst, uint64(periodStart))
}

func u64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

func getU64(b []byte) uint64 {
	if len(b) != 8 {
		return 0
	}
	return binary.BigEndian.Uint64(b)
}
