package store

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"math"
	"slices"

	bolt "go.etcd.io/bbolt"
)

// ReadingsQuery selects a page of one device's readings.
type ReadingsQuery struct {
	From, To int64  // inclusive Unix ms bounds; To 0 means no upper bound
	Metric   string // when set, only readings with this metric, reduced to it
	Limit    int
	Cursor   string // from a previous page's Next; empty for the first page
}

// ReadingsPage is one page of readings in time order.
type ReadingsPage struct {
	Items []Reading
	Next  string // empty when there are no more
}

// EncodeCursor and decodeCursor make the opaque page cursor: the last key
// returned, so the next page resumes exactly after it whatever was inserted.
func encodeCursor(key []byte) string { return base64.RawURLEncoding.EncodeToString(key) }

func decodeCursor(c string) ([]byte, error) {
	k, err := base64.RawURLEncoding.DecodeString(c)
	if err != nil || len(k) != 16 {
		return nil, ErrBadCursor
	}
	return k, nil
}

// Readings returns one page of a device's readings in time order.
func (s *Store) Readings(device string, q ReadingsQuery) (ReadingsPage, error) {
	var page ReadingsPage
	if q.Limit <= 0 {
		q.Limit = 100
	}
	if q.To <= 0 {
		q.To = math.MaxInt64
	}
	start := binary.BigEndian.AppendUint64(nil, uint64(max(q.From, 0)))
	var after []byte
	if q.Cursor != "" {
		k, err := decodeCursor(q.Cursor)
		if err != nil {
			return page, err
		}
		after = k
		start = k
	}
	err := s.db.View(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketDevices).Get([]byte(device)) == nil {
			return ErrNotFound
		}
		b := newSpan(tx.Bucket(bucketReadings), device)
		page.Items = make([]Reading, 0, min(q.Limit, 1024))
		c := b.Cursor()
		k, v := c.Seek(start)
		if after != nil && k != nil && bytes.Equal(k, after) {
			k, v = c.Next()
		}
		var last []byte
		for ; k != nil; k, v = c.Next() {
			ts := keyTS(k)
			if ts > q.To {
				return nil
			}
			if len(page.Items) == q.Limit {
				page.Next = encodeCursor(last)
				return nil
			}
			r, _, err := decodeReadingValue(k, v)
			if err != nil {
				return fmt.Errorf("decode reading of %s at %d: %w", device, ts, err)
			}
			last = k
			if q.Metric != "" {
				var keep []Metric
				for _, m := range r.Metrics {
					if m.Name == q.Metric {
						keep = append(keep, m)
						break
					}
				}
				if keep == nil {
					continue
				}
				r.Metrics = keep
			}
			page.Items = append(page.Items, r)
		}
		return nil
	})
	return page, err
}

// Latest returns a device's newest reading.
func (s *Store) Latest(device string) (Reading, error) {
	var r Reading
	err := s.db.View(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketDevices).Get([]byte(device)) == nil {
			return ErrNotFound
		}
		k, v := newSpan(tx.Bucket(bucketReadings), device).Cursor().Last()
		if k == nil {
			return ErrNotFound
		}
		var err error
		r, _, err = decodeReadingValue(k, v)
		return err
	})
	return r, err
}

// StatsBucket is one downsampled period of one metric.
type StatsBucket struct {
	TS    int64   `json:"ts"` // period start, Unix ms
	Count uint64  `json:"count"`
	Min   float64 `json:"min"`
	Max   float64 `json:"max"`
	Avg   float64 `json:"avg"`
}

// Stats downsamples one metric of one device over [from, to] (inclusive, Unix
// ms) into periods of step ms aligned to multiples of step. Whole hours and
// minutes are answered from rollups kept at ingest; only the ragged edges of
// the range are scanned, so the cost follows the number of periods, not the
// number of readings.
func (s *Store) Stats(device, metric string, from, to, step int64) ([]StatsBucket, error) {
	if step <= 0 || from > to {
		return nil, fmt.Errorf("stats: bad range [%d, %d] step %d", from, to, step)
	}
	// Readings have non-negative stamps; clamping keeps rollup seeks (which
	// use unsigned keys) and the period arithmetic from wrapping around.
	from = max(from, 0)
	to = min(to, math.MaxInt64-2*hourMs)
	if from > to {
		return nil, nil
	}
	end := to + 1 // exclusive
	cells := map[int64]*agg{}
	add := func(ts int64, a agg) {
		p := ts - mod(ts, step)
		c := cells[p]
		if c == nil {
			c = new(agg)
			cells[p] = c
		}
		c.merge(a)
	}
	err := s.db.View(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketDevices).Get([]byte(device)) == nil {
			return ErrNotFound
		}
		q := statsQuery{
			raw:    newSpan(tx.Bucket(bucketReadings), device),
			minute: newSpan(tx.Bucket(bucketMinute), device),
			hour:   newSpan(tx.Bucket(bucketHour), device),
			metric: metric, add: add,
		}
		switch {
		case step%hourMs == 0:
			return q.hours(from, end)
		case step%minuteMs == 0:
			return q.minutes(from, end)
		default:
			return q.scan(from, end)
		}
	})
	if err != nil {
		return nil, err
	}
	// Walk the periods that have data, not every period of the range: a
	// small step over a long range would otherwise loop for hours.
	periods := make([]int64, 0, len(cells))
	for p, c := range cells {
		if c.Count > 0 {
			periods = append(periods, p)
		}
	}
	slices.Sort(periods)
	out := make([]StatsBucket, 0, len(periods))
	for _, p := range periods {
		c := cells[p]
		out = append(out, StatsBucket{TS: p, Count: c.Count, Min: c.Min, Max: c.Max, Avg: c.Sum / float64(c.Count)})
	}
	return out, nil
}

func mod(a, b int64) int64 {
	m := a % b
	if m < 0 {
		m += b
	}
	return m
}

func ceilTo(v, unit int64) int64 {
	if r := mod(v, unit); r != 0 {
		return v + unit - r
	}
	return v
}

type statsQuery struct {
	raw, minute, hour *span
	metric            string
	add               func(ts int64, a agg)
}

// hours answers [from, end) from hourly rollups, delegating partial hours at
// the edges to minutes.
func (q statsQuery) hours(from, end int64) error {
	lo, hi := ceilTo(from, hourMs), end-mod(end, hourMs)
	if lo >= hi {
		return q.minutes(from, end)
	}
	if err := q.minutes(from, lo); err != nil {
		return err
	}
	if err := q.rollup(q.hour, lo, hi); err != nil {
		return err
	}
	return q.minutes(hi, end)
}

func (q statsQuery) minutes(from, end int64) error {
	if from >= end {
		return nil
	}
	lo, hi := ceilTo(from, minuteMs), end-mod(end, minuteMs)
	if lo >= hi {
		return q.scan(from, end)
	}
	if err := q.scan(from, lo); err != nil {
		return err
	}
	if err := q.rollup(q.minute, lo, hi); err != nil {
		return err
	}
	return q.scan(hi, end)
}

func (q statsQuery) rollup(b *span, from, end int64) error {
	if from >= end {
		return nil
	}
	prefix := rollupKey(q.metric, 0)[:len(q.metric)+1]
	c := b.Cursor()
	for k, v := c.Seek(rollupKey(q.metric, from)); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
		ts := int64(binary.BigEndian.Uint64(k[len(prefix):]))
		if ts >= end {
			break
		}
		a, err := decodeAgg(v)
		if err != nil {
			return err
		}
		q.add(ts, a)
	}
	return nil
}

func (q statsQuery) scan(from, end int64) error {
	if from >= end {
		return nil
	}
	c := q.raw.Cursor()
	var buf []Metric
	for k, v := c.Seek(binary.BigEndian.AppendUint64(nil, uint64(max(from, 0)))); k != nil; k, v = c.Next() {
		ts := keyTS(k)
		if ts >= end {
			break
		}
		_, w := binary.Uvarint(v) // seq
		l, w2 := binary.Uvarint(v[w:])
		var err error
		buf, _, err = readMetrics(v[w+w2+int(l):], buf[:0])
		if err != nil {
			return err
		}
		for _, m := range buf {
			if m.Name == q.metric {
				var a agg
				a.add(m.Value)
				q.add(ts, a)
			}
		}
	}
	return nil
}
