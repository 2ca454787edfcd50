package wire

import (
	"encoding/json"
	"math"
	"strconv"
	"unicode/utf8"
)

// The push codec: the bulk of the sync traffic is readings, and a push of
// 5,000 of them through encoding/json and a map per reading cost the edge
// and the cloud's leader more CPU than committing them. AppendPushBatch
// writes a batch's readings by hand, and DecodePushBatch reads the common
// shape of a push (readings changes with plain keys) into Reading.Sorted,
// which Validate, Digest and the cloud's log encoding walk without a map or
// a sort. The JSON on the network is what it was (keys in the same places,
// numbers in encoding/json's format): old edges and old clouds read it.

// Metric is one named value of a reading.
type Metric struct {
	Name  string
	Value float64
}

// SortedMetrics returns r's metrics sorted by name: r.Sorted as it is, or
// Metrics' entries sorted into *buf, which it keeps for the next call (the
// result is valid until then).
func (r *Reading) SortedMetrics(buf *[]Metric) []Metric {
	if r.Metrics == nil {
		return r.Sorted
	}
	b := (*buf)[:0]
	for k, v := range r.Metrics {
		b = append(b, Metric{Name: k, Value: v})
	}
	sortMetrics(b)
	*buf = b
	return b
}

// sortMetrics sorts ms by name: an insertion sort, as a reading has a
// handful of metrics, often already in order.
func sortMetrics(ms []Metric) {
	for i := 1; i < len(ms); i++ {
		for j := i; j > 0 && ms[j].Name < ms[j-1].Name; j-- {
			ms[j], ms[j-1] = ms[j-1], ms[j]
		}
	}
}

// SortMetrics returns ms sorted by name, in place, and whether no name is
// there twice: the check a caller filling Reading.Sorted needs.
func SortMetrics(ms []Metric) ([]Metric, bool) {
	sortMetrics(ms)
	for i := 1; i < len(ms); i++ {
		if ms[i].Name == ms[i-1].Name {
			return ms, false
		}
	}
	return ms, true
}

// AppendPushBatch appends p's JSON to dst: the document json.Marshal(p)
// writes, up to the spacing and escaping of strings (the same values once
// decoded), with readings written straight from Sorted or Metrics. A
// metric that is NaN or infinite is refused (ErrInvalid), as json.Marshal
// refuses it.
func AppendPushBatch(dst []byte, p *PushBatch) ([]byte, error) {
	dst = append(dst, `{"edge":`...)
	dst = appendJSONString(dst, p.Edge)
	dst = append(dst, `,"first_seq":`...)
	dst = strconv.AppendUint(dst, p.FirstSeq, 10)
	dst = append(dst, `,"changes":`...)
	if p.Changes == nil {
		dst = append(dst, "null"...)
	} else {
		dst = append(dst, '[')
		var buf []Metric
		for i := range p.Changes {
			if i > 0 {
				dst = append(dst, ',')
			}
			var err error
			if dst, buf, err = appendChangeJSON(dst, &p.Changes[i], buf); err != nil {
				return nil, err
			}
		}
		dst = append(dst, ']')
	}
	return append(dst, '}'), nil
}

// appendChangeJSON writes one change: a readings change by hand, any other
// through encoding/json (its fields are many and rare).
func appendChangeJSON(dst []byte, c *Change, buf []Metric) ([]byte, []Metric, error) {
	if len(c.Readings) == 0 {
		j, err := json.Marshal(c)
		return append(dst, j...), buf, err
	}
	if c.Doc != nil || c.Meta != nil || c.User != nil || c.Sessions != nil || c.Alert != nil {
		// Readings beside another payload: no change the edge makes, but
		// encode it whole, with the readings as maps encoding/json knows.
		cp := *c
		cp.Readings = make([]Reading, len(c.Readings))
		for i := range c.Readings {
			r := &c.Readings[i]
			m := r.Metrics
			if m == nil && r.Sorted != nil {
				m = make(map[string]float64, len(r.Sorted))
				for _, mt := range r.Sorted {
					m[mt.Name] = mt.Value
				}
			}
			cp.Readings[i] = Reading{TS: r.TS, ID: r.ID, Metrics: m}
		}
		j, err := json.Marshal(&cp)
		return append(dst, j...), buf, err
	}
	dst = append(dst, `{"kind":`...)
	dst = appendJSONString(dst, c.Kind)
	if c.Device != "" {
		dst = append(dst, `,"device":`...)
		dst = appendJSONString(dst, c.Device)
	}
	dst = append(dst, `,"readings":[`...)
	for i := range c.Readings {
		r := &c.Readings[i]
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = append(dst, `{"ts":`...)
		dst = strconv.AppendInt(dst, r.TS, 10)
		if r.ID != "" {
			dst = append(dst, `,"id":`...)
			dst = appendJSONString(dst, r.ID)
		}
		dst = append(dst, `,"metrics":`...)
		if r.Metrics == nil && r.Sorted == nil {
			dst = append(dst, "null}"...)
			continue
		}
		ms := r.SortedMetrics(&buf)
		dst = append(dst, '{')
		for j, m := range ms {
			if math.IsNaN(m.Value) || math.IsInf(m.Value, 0) {
				return nil, buf, invalid("device %q reading %d: metric %q is not a finite number", clip(c.Device), i, clip(m.Name))
			}
			if j > 0 {
				dst = append(dst, ',')
			}
			dst = appendJSONString(dst, m.Name)
			dst = append(dst, ':')
			dst = appendJSONFloat(dst, m.Value)
		}
		dst = append(dst, "}}"...)
	}
	dst = append(dst, ']')
	if c.Actor != "" {
		dst = append(dst, `,"actor":`...)
		dst = appendJSONString(dst, c.Actor)
	}
	if c.Proof != "" {
		dst = append(dst, `,"proof":`...)
		dst = appendJSONString(dst, c.Proof)
	}
	return append(dst, '}'), buf, nil
}

// appendJSONFloat formats f as encoding/json does a float64: the shortest
// representation that reads back as f, in exponent form only below 1e-6
// or from 1e21, with a one-digit exponent unpadded (1e-7, not 1e-07).
func appendJSONFloat(dst []byte, f float64) []byte {
	if b, ok := appendShortDecimal(dst, f); ok {
		return b
	}
	abs := math.Abs(f)
	format := byte('f')
	if abs != 0 && (abs < 1e-6 || abs >= 1e21) {
		format = 'e'
	}
	dst = strconv.AppendFloat(dst, f, format, -1, 64)
	if format == 'e' {
		if n := len(dst); n >= 4 && dst[n-4] == 'e' && dst[n-3] == '-' && dst[n-2] == '0' {
			dst[n-2] = dst[n-1]
			dst = dst[:n-1]
		}
	}
	return dst
}

// appendShortDecimal writes f the way strconv.AppendFloat(f, 'f', -1)
// does, for the values telemetry mostly holds (21.5, 40, 1013.25): a
// decimal of at most four fractional digits, of magnitude below 2^53. It
// reports false for anything else, which strconv then formats.
//
// Why it is the same text: for the smallest k such that an integer m with
// m / 10^k == f exists (m and 10^k exact doubles, so the division is
// correctly rounded, as ParseFloat of the decimal is), the decimal
// m·10^-k reads back as f and no decimal of fewer fractional digits (so
// none of fewer significant digits) does: that is the shortest
// representation strconv finds. It is the only one with k digits when
// f's spacing (ulp) is below 10^-k, which is required, so strconv's tie
// rule (the closest of several shortest) never comes into play. m is found
// among the integers next to f·10^k, whose rounding error is far below one.
func appendShortDecimal(dst []byte, f float64) ([]byte, bool) {
	a := math.Abs(f)
	if a >= 1<<40 || a < 1e-4 || a != a {
		return dst, false
	}
	ulp := math.Nextafter(a, math.Inf(1)) - a
	for k, p := range exactPow10[:5] {
		if ulp*p >= 0.25 {
			return dst, false
		}
		x := a * p
		m := math.Round(x)
		var ok bool
		for _, c := range [...]float64{m, m - 1, m + 1} {
			if c > 0 && c/p == a {
				if ok {
					return dst, false // two candidates: leave it to strconv
				}
				m, ok = c, true
			}
		}
		if !ok {
			continue
		}
		u := uint64(m)
		if k > 0 && u%10 == 0 {
			return dst, false // not the fewest digits after all
		}
		if f < 0 {
			dst = append(dst, '-')
		}
		if k == 0 {
			return strconv.AppendUint(dst, u, 10), true
		}
		div := uint64(p)
		dst = strconv.AppendUint(dst, u/div, 10)
		dst = append(dst, '.')
		frac := u % div
		for d := div / 10; d > 0; d /= 10 {
			dst = append(dst, byte('0'+frac/d%10))
		}
		return dst, true
	}
	return dst, false
}

const hexDigits = "0123456789abcdef"

// appendJSONString writes s as a JSON string. Invalid UTF-8 becomes
// U+FFFD, as encoding/json writes it; <, > and & stay as they are (the
// value is the same; encoding/json escapes them for HTML).
func appendJSONString(dst []byte, s string) []byte {
	dst = append(dst, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' && c < utf8.RuneSelf {
			i++
			continue
		}
		if c < utf8.RuneSelf {
			dst = append(dst, s[start:i]...)
			switch c {
			case '"', '\\':
				dst = append(dst, '\\', c)
			case '\n':
				dst = append(dst, '\\', 'n')
			case '\r':
				dst = append(dst, '\\', 'r')
			case '\t':
				dst = append(dst, '\\', 't')
			default:
				dst = append(dst, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			dst = append(dst, s[start:i]...)
			dst = append(dst, `\ufffd`...)
			i += size
			start = i
			continue
		}
		i += size
	}
	dst = append(dst, s[start:]...)
	return append(dst, '"')
}

// DecodePushBatch decodes a push body into p (zero) when it has the shape
// edges send: an object of edge, first_seq and changes, readings changes
// (kind, device, readings of ts, id and metrics; actor and proof) with
// plain keys, each key once, no escape in a string and no null. Their
// readings come with Sorted set and Metrics nil.
//
// A change it does not take (another kind, another key or a key twice, a
// metric name twice, an escape, a null, a number an integer field refuses,
// more than MaxMetrics metrics, a reading past MaxReadingsTotal in the
// batch) is checked under the JSON rules and handed as its raw JSON to
// other, which decodes it in place the general way. It reports false,
// leaving p to be discarded, when other is nil or refuses such a change,
// when the batch is not of that shape, holds more than MaxBatchChanges
// changes, or breaks the JSON
// rules (CheckJSON at MaxSyncJSONDepth). The caller then decodes the whole
// body the general way, which words every refusal. So every answer is the
// one the general decoder gave before this one existed (a metric named
// twice keeps its last value), and FuzzDecodePushBatch holds what it takes
// to the general decoder's batch.
func DecodePushBatch(body []byte, p *PushBatch, other func(raw []byte, c *Change) error) bool {
	d := pushDecoder{b: body, other: other, names: make(map[string]string, 16)}
	est := min(len(body)/48+1, MaxReadingsTotal)
	d.readings = make([]Reading, 0, est)
	d.metrics = make([]Metric, 0, 2*est)
	return d.batch(p)
}

// pushDecoder is DecodePushBatch's state: the body, the position, and the
// slabs every reading and metric of the batch is cut from.
type pushDecoder struct {
	b        []byte
	i        int
	other    func([]byte, *Change) error
	names    map[string]string // interned device and metric names
	readings []Reading
	metrics  []Metric
	last     []Metric // the metrics of the reading read last
}

// maxInterned bounds the interned names: a hostile batch of distinct
// names allocates each as it would without interning.
const maxInterned = 4096

func (d *pushDecoder) space() {
	b, i := d.b, d.i
	for i < len(b) && (b[i] == ' ' || b[i] == '\n' || b[i] == '\t' || b[i] == '\r') {
		i++
	}
	d.i = i
}

// next skips space and consumes c if it is next.
func (d *pushDecoder) next(c byte) bool {
	d.space()
	if d.i < len(d.b) && d.b[d.i] == c {
		d.i++
		return true
	}
	return false
}

// peek skips space and reports whether c is next, without consuming it.
func (d *pushDecoder) peek(c byte) bool {
	d.space()
	return d.i < len(d.b) && d.b[d.i] == c
}

// raw reads a string without escapes or control characters and with valid
// UTF-8, returning its bytes (in the body).
func (d *pushDecoder) raw() ([]byte, bool) {
	if !d.next('"') {
		return nil, false
	}
	b, i := d.b, d.i
	ascii := true
	for i < len(b) {
		c := b[i]
		if c == '"' {
			break
		}
		if c < 0x20 || c == '\\' {
			return nil, false
		}
		if c >= utf8.RuneSelf {
			ascii = false
		}
		i++
	}
	if i >= len(b) {
		return nil, false
	}
	s := b[d.i:i]
	if !ascii && !utf8.Valid(s) {
		return nil, false
	}
	d.i = i + 1
	return s, true
}

// key reads an object key and its colon. Callers switch on
// string(key), which does not allocate.
func (d *pushDecoder) key() ([]byte, bool) {
	k, ok := d.raw()
	if !ok || !d.next(':') {
		return nil, false
	}
	return k, true
}

// intern returns s as a string, shared with earlier equal names.
func (d *pushDecoder) intern(s []byte) string {
	if v, ok := d.names[string(s)]; ok {
		return v
	}
	v := string(s)
	if len(d.names) < maxInterned {
		d.names[v] = v
	}
	return v
}

func (d *pushDecoder) str() (string, bool) {
	s, ok := d.raw()
	if !ok {
		return "", false
	}
	return string(s), true
}

// integer reads a JSON integer: no fraction or exponent, which an integer
// field refuses, and no "-0".
func (d *pushDecoder) integer(signed bool) (neg bool, u uint64, ok bool) {
	d.space()
	b, i := d.b, d.i
	if signed && i < len(b) && b[i] == '-' {
		neg = true
		i++
	}
	start := i
	for i < len(b) && b[i]-'0' <= 9 {
		i++
	}
	n := i - start
	if n == 0 || n > 19 || (n > 1 && b[start] == '0') || (neg && b[start] == '0') {
		return false, 0, false
	}
	if i < len(b) && (b[i] == '.' || b[i] == 'e' || b[i] == 'E') {
		return false, 0, false
	}
	for _, c := range b[start:i] {
		u = u*10 + uint64(c-'0')
	}
	d.i = i
	return neg, u, true
}

func (d *pushDecoder) uint() (uint64, bool) {
	_, u, ok := d.integer(false)
	return u, ok
}

func (d *pushDecoder) int() (int64, bool) {
	neg, u, ok := d.integer(true)
	if !ok || u > math.MaxInt64 {
		return 0, false
	}
	if neg {
		return -int64(u), true
	}
	return int64(u), true
}

// float reads a JSON number, under the JSON rules (finite as float64).
func (d *pushDecoder) float() (float64, bool) {
	d.space()
	if d.i >= len(d.b) {
		return 0, false
	}
	if f, ok := d.shortDecimal(); ok {
		return f, true
	}
	s := jsonScanner{b: d.b, i: d.i, max: 1}
	if c := d.b[d.i]; c != '-' && (c < '0' || c > '9') {
		return 0, false
	}
	if s.number() != nil {
		return 0, false
	}
	// strconv keeps nothing of the string: the conversion of a short
	// token does not allocate.
	f, err := strconv.ParseFloat(string(d.b[d.i:s.i]), 64)
	if err != nil {
		return 0, false
	}
	d.i = s.i
	return f, true
}

// exactPow10 are the powers of ten a double holds exactly, up to 1e15.
var exactPow10 = [...]float64{1, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15}

// shortDecimal reads a number of at most 15 digits without an exponent
// (21.5, -40, 1013.25), as strconv.ParseFloat would: its digits m and
// 10^k (k fractional digits) are exact doubles, so m / 10^k is the
// correctly rounded value, which is what ParseFloat returns. Anything
// else is left to the general path (false, nothing consumed).
func (d *pushDecoder) shortDecimal() (float64, bool) {
	b, i := d.b, d.i
	neg := i < len(b) && b[i] == '-'
	if neg {
		i++
	}
	start := i
	var m uint64
	for i < len(b) && b[i]-'0' <= 9 {
		m = m*10 + uint64(b[i]-'0')
		i++
	}
	n := i - start
	if n == 0 || (n > 1 && b[start] == '0') {
		return 0, false
	}
	k := 0
	if i < len(b) && b[i] == '.' {
		i++
		fs := i
		for i < len(b) && b[i]-'0' <= 9 {
			m = m*10 + uint64(b[i]-'0')
			i++
		}
		k = i - fs
		if k == 0 {
			return 0, false
		}
	}
	if n+k > 15 || (i < len(b) && (b[i] == 'e' || b[i] == 'E')) {
		return 0, false
	}
	f := float64(m) / exactPow10[k]
	if neg {
		f = -f
	}
	d.i = i
	return f, true
}

func (d *pushDecoder) batch(p *PushBatch) bool {
	if !d.next('{') {
		return false
	}
	var seen [3]bool
	for {
		k, ok := d.key()
		if !ok {
			return false
		}
		switch string(k) {
		case "edge":
			if seen[0] {
				return false
			}
			seen[0] = true
			if p.Edge, ok = d.str(); !ok {
				return false
			}
		case "first_seq":
			if seen[1] {
				return false
			}
			seen[1] = true
			if p.FirstSeq, ok = d.uint(); !ok {
				return false
			}
		case "changes":
			if seen[2] {
				return false
			}
			seen[2] = true
			if !d.changes(p) {
				return false
			}
		default:
			return false
		}
		if d.next(',') {
			continue
		}
		if !d.next('}') {
			return false
		}
		break
	}
	d.space()
	return d.i == len(d.b) && seen[0] && seen[1] && seen[2]
}

func (d *pushDecoder) changes(p *PushBatch) bool {
	if !d.next('[') || d.peek(']') {
		return false
	}
	for {
		if len(p.Changes) == MaxBatchChanges {
			return false
		}
		p.Changes = append(p.Changes, Change{})
		c := &p.Changes[len(p.Changes)-1]
		start, rs, ms := d.i, len(d.readings), len(d.metrics)
		if !d.readingsChange(c) {
			// Not the shape taken here: back to the change's start, check
			// it under the JSON rules (it sits at depth 3 of the batch)
			// and let other decode it.
			*c = Change{}
			d.i, d.readings, d.metrics = start, d.readings[:rs], d.metrics[:ms]
			d.space()
			s := jsonScanner{b: d.b, i: d.i, depth: 2, max: MaxSyncJSONDepth}
			if d.other == nil || s.value() != nil {
				return false
			}
			if d.other(d.b[d.i:s.i], c) != nil {
				return false
			}
			d.i = s.i
		}
		if d.next(',') {
			continue
		}
		return d.next(']')
	}
}

// readingsChange reads a readings change into c, or reports false.
func (d *pushDecoder) readingsChange(c *Change) bool {
	if !d.next('{') {
		return false
	}
	var seen [5]bool
	for {
		k, ok := d.key()
		if !ok {
			return false
		}
		var at int
		switch string(k) {
		case "kind":
			at = 0
			var s []byte
			if s, ok = d.raw(); !ok || string(s) != KindReadings {
				return false
			}
			c.Kind = KindReadings
		case "device":
			at = 1
			var s []byte
			if s, ok = d.raw(); !ok {
				return false
			}
			c.Device = d.intern(s)
		case "readings":
			at = 2
			if c.Readings, ok = d.readingList(); !ok {
				return false
			}
		case "actor":
			at = 3
			if c.Actor, ok = d.str(); !ok {
				return false
			}
		case "proof":
			at = 4
			if c.Proof, ok = d.str(); !ok {
				return false
			}
		default:
			return false
		}
		if seen[at] {
			return false
		}
		seen[at] = true
		if d.next(',') {
			continue
		}
		return d.next('}') && seen[0] && seen[2]
	}
}

func (d *pushDecoder) readingList() ([]Reading, bool) {
	if !d.next('[') || d.peek(']') {
		return nil, false
	}
	start := len(d.readings)
	for {
		// d.readings holds every reading the batch has taken: the bound
		// holds before one more is buffered.
		if len(d.readings) >= MaxReadingsTotal {
			return nil, false
		}
		d.readings = append(d.readings, Reading{})
		if !d.reading(&d.readings[len(d.readings)-1]) {
			return nil, false
		}
		if d.next(',') {
			continue
		}
		if !d.next(']') {
			return nil, false
		}
		n := len(d.readings)
		return d.readings[start:n:n], true
	}
}

func (d *pushDecoder) reading(r *Reading) bool {
	if !d.next('{') {
		return false
	}
	var seen [3]bool
	for {
		k, ok := d.key()
		if !ok {
			return false
		}
		var at int
		switch string(k) {
		case "ts":
			at = 0
			if r.TS, ok = d.int(); !ok {
				return false
			}
		case "id":
			at = 1
			if r.ID, ok = d.str(); !ok {
				return false
			}
		case "metrics":
			at = 2
			if r.Sorted, ok = d.metricObject(); !ok {
				return false
			}
		default:
			return false
		}
		if seen[at] {
			return false
		}
		seen[at] = true
		if d.next(',') {
			continue
		}
		return d.next('}') && seen[0] && seen[2]
	}
}

func (d *pushDecoder) metricObject() ([]Metric, bool) {
	if !d.next('{') || d.peek('}') {
		return nil, false
	}
	start := len(d.metrics)
	for {
		if len(d.metrics)-start >= MaxMetrics {
			return nil, false
		}
		name, ok := d.key()
		if !ok {
			return nil, false
		}
		v, ok := d.float()
		if !ok {
			return nil, false
		}
		// Readings of a change mostly name the same metrics in the same
		// order (edges write them sorted): the previous reading's name at
		// this place spares the interning map's hash.
		var nm string
		if j := len(d.metrics) - start; j < len(d.last) && d.last[j].Name == string(name) {
			nm = d.last[j].Name
		} else {
			nm = d.intern(name)
		}
		d.metrics = append(d.metrics, Metric{Name: nm, Value: v})
		if d.next(',') {
			continue
		}
		if !d.next('}') {
			return nil, false
		}
		n := len(d.metrics)
		ms, unique := SortMetrics(d.metrics[start:n:n])
		d.last = ms
		return ms, unique
	}
}
