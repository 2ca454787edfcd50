package main

import (
	"math"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/outpost-edge/outpost/internal/benchproc"
)

// The stages of a phone delivery, from the device's side: a reading's
// "t" (µs since start) is taken when its body is made, before the device
// waits for room in its window of o.inflight; "sent" is the publish call
// and "acked" the device seeing the PUBACK (the edge's durable commit is
// before it). A phone's delivery of reading n of device d is looked up in
// d's ring, so each delivery splits into window wait, publish→ack and
// ack→phone read (the live feed's hold, the fan-out, the phone's write
// and read); the edge's own commit→WebSocket write histogram
// (outpost_mqtt_live_delivery_duration_seconds) is scraped around the run.

const ringSize = 1 << 12 // readings of a device remembered: ~7 s at full rate

type ringEntry struct{ t0, sent, acked atomic.Int64 } // µs since start

type ring [ringSize]ringEntry

func (r *ring) at(n int) *ringEntry { return &r[n%ringSize] }

// hist is a lock-free latency histogram of 100 µs buckets up to 2 s.
type hist struct {
	b [20001]atomic.Int64
}

func (h *hist) add(d time.Duration) {
	i := min(max(int(d/(100*time.Microsecond)), 0), len(h.b)-1)
	h.b[i].Add(1)
}

// quantile in ms.
func (h *hist) quantile(q float64) float64 {
	var n int64
	for i := range h.b {
		n += h.b[i].Load()
	}
	if n == 0 {
		return 0
	}
	want := int64(math.Ceil(q * float64(n)))
	var c int64
	for i := range h.b {
		if c += h.b[i].Load(); c >= want {
			return float64(i+1) / 10
		}
	}
	return float64(len(h.b)) / 10
}

func (h *hist) summary() map[string]float64 {
	return map[string]float64{"p50_ms": h.quantile(0.5), "p99_ms": h.quantile(0.99)}
}

// delivery is one phone delivery's stages, µs.
type delivery struct {
	total, wait, ack, afterAck int64 // ack, afterAck < 0: the ack was not seen yet (or the ring moved on)
}

type deliveries struct {
	mu sync.Mutex
	d  []delivery
}

func (l *deliveries) add(d delivery) { l.mu.Lock(); l.d = append(l.d, d); l.mu.Unlock() }

// totals: the p50 and p99 (ms) of the deliveries' publish-to-phone
// latency, and how many there were.
func (l *deliveries) totals() (p50, p99 float64, n int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.d) == 0 {
		return 0, 0, 0
	}
	v := make([]int64, len(l.d))
	for i, d := range l.d {
		v[i] = d.total
	}
	slices.Sort(v)
	return msAt(v, 0.5), msAt(v, 0.99), len(v)
}

// msAt is the p quantile (ms) of v, sorted µs.
func msAt(v []int64, p float64) float64 { return float64(v[int(p*float64(len(v)-1))]) / 1000 }

// breakdown: each stage's p50 and p99 over all deliveries, and each
// stage's mean over the slowest 1 % (what the tail is made of).
func (l *deliveries) breakdown() map[string]any {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.d) == 0 {
		return nil
	}
	out := map[string]any{}
	q := func(name string, f func(delivery) int64) {
		var v []int64
		for _, d := range l.d {
			if x := f(d); x >= 0 {
				v = append(v, x)
			}
		}
		if len(v) == 0 {
			return
		}
		slices.Sort(v)
		out[name] = map[string]any{"p50_ms": msAt(v, 0.5), "p99_ms": msAt(v, 0.99), "n": len(v)}
	}
	q("window_wait", func(d delivery) int64 { return d.wait })
	q("publish_to_ack", func(d delivery) int64 { return d.ack })
	q("ack_to_phone_read", func(d delivery) int64 { return d.afterAck })
	ds := slices.Clone(l.d)
	slices.SortFunc(ds, func(a, b delivery) int { return int(b.total - a.total) })
	tail := ds[:max(1, len(ds)/100)]
	var sum [4]float64
	var known float64
	for _, d := range tail {
		sum[0] += float64(d.total)
		sum[1] += float64(d.wait)
		if d.ack >= 0 {
			sum[2] += float64(d.ack)
			sum[3] += float64(d.afterAck)
			known++
		}
	}
	n := float64(len(tail))
	tm := map[string]float64{"n": n, "total_ms": sum[0] / n / 1000, "window_wait_ms": sum[1] / n / 1000}
	if known > 0 {
		tm["publish_to_ack_ms"], tm["ack_to_phone_read_ms"] = sum[2]/known/1000, sum[3]/known/1000
	}
	out["slowest_1pct_mean"] = tm
	return out
}

// scrape reads the edge's /metrics histograms named in names: per name,
// cumulative bucket counts by upper bound.
func scrape(addr, token string, names ...string) (map[string]map[float64]float64, error) {
	m, err := benchproc.ScrapeAuth(http.DefaultClient, "http://"+addr+"/metrics", token)
	if err != nil {
		return nil, err
	}
	out := map[string]map[float64]float64{}
	for _, n := range names {
		out[n] = m.Buckets(n)
	}
	return out, nil
}

// bucketQuantiles: p50, p90 and p99 (ms, the bucket's upper bound) of a
// histogram's cumulative bucket counts (of some runs: addDelta's).
func bucketQuantiles(counts map[float64]float64) map[string]float64 {
	var les []float64
	for le := range counts {
		les = append(les, le)
	}
	slices.Sort(les)
	if len(les) == 0 {
		return nil
	}
	total := counts[les[len(les)-1]]
	if total <= 0 {
		return map[string]float64{"n": 0}
	}
	q := func(p float64) float64 {
		for _, le := range les {
			if counts[le] >= p*total {
				if math.IsInf(le, 1) {
					break
				}
				return le * 1000
			}
		}
		return -1 // beyond the last bucket
	}
	return map[string]float64{"n": total, "p50_le_ms": q(0.5), "p90_le_ms": q(0.9), "p99_le_ms": q(0.99)}
}
