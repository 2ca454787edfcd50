package wire

import (
	"fmt"
	"math"
	"strconv"
	"unicode/utf8"
)

// The JSON rules: every JSON text the daemons accept from a device (MQTT
// payloads), a client (HTTP bodies) or another daemon (sync batches and
// pages) must be one RFC 8259 value that
//
//   - nests arrays and objects at most a bounded depth (MaxJSONDepth for
//     payloads and bodies, MaxSyncJSONDepth for sync batches and pages);
//   - holds only valid UTF-8 in its strings and keys, and no unpaired
//     surrogate escape (\ud800): what a strict decoder refuses or silently
//     replaces;
//   - holds only numbers that are finite as float64: 1e400 is valid JSON
//     but decodes to +Inf (or fails to decode) in most clients.
//
// What passes is stored and served back as is, so a phone parsing the device
// list never meets what would crash its parser. The grammar (RFC 8259) is
// checked too, so CheckJSON subsumes json.Valid.
const (
	// MaxJSONDepth bounds the nesting of an MQTT payload, an HTTP body and
	// a single state value.
	MaxJSONDepth = 32
	// MaxSyncJSONDepth bounds the nesting of a sync batch or pull page:
	// a state value sits inside batch, change list, change, doc and field
	// (five levels; the pull page's envelope one more), so every value an
	// edge or the cloud accepted fits in a sync body.
	MaxSyncJSONDepth = MaxJSONDepth + 8
)

// ErrJSONSyntax marks a CheckJSON refusal for bad grammar, as opposed to
// one for breaking a rule (depth, UTF-8, range) of otherwise valid JSON:
// callers word the two differently. It matches ErrInvalid too.
var ErrJSONSyntax = fmt.Errorf("%w: JSON syntax", ErrInvalid)

// maxCheckDepth caps any depth CheckJSON is asked for: the scanner recurses
// once per level.
const maxCheckDepth = 1024

// CheckJSON checks b against the JSON rules with nesting at most maxDepth
// (capped at 1024). It makes one pass over b and does not allocate unless b
// is refused. The error matches ErrInvalid and names the byte offset.
func CheckJSON(b []byte, maxDepth int) error {
	s := jsonScanner{b: b, max: min(maxDepth, maxCheckDepth)}
	s.space()
	if err := s.value(); err != nil {
		return err
	}
	s.space()
	if s.i != len(s.b) {
		return s.syntax("trailing data after the JSON value")
	}
	return nil
}

// CheckValue checks one state value: the JSON rules at MaxJSONDepth.
func CheckValue(v []byte) error { return CheckJSON(v, MaxJSONDepth) }

// jsonScanner is a recursive-descent validator; it lives on the caller's
// stack.
type jsonScanner struct {
	b     []byte
	i     int
	depth int
	max   int
}

func (s *jsonScanner) syntax(what string) error {
	return &ruleError{kind: ErrJSONSyntax, msg: fmt.Sprintf("JSON syntax error at byte %d: %s", s.i, what)}
}

// The hot loops below work on locals: through the pointer, every byte
// would reload s.b and s.i.

func (s *jsonScanner) space() {
	b, i := s.b, s.i
	for i < len(b) && (b[i] == ' ' || b[i] == '\n' || b[i] == '\t' || b[i] == '\r') {
		i++
	}
	s.i = i
}

func (s *jsonScanner) value() error {
	if s.i >= len(s.b) {
		return s.syntax("unexpected end of input")
	}
	switch c := s.b[s.i]; {
	case c == '{':
		return s.object()
	case c == '[':
		return s.array()
	case c == '"':
		return s.str()
	case c == 't':
		return s.literal("true")
	case c == 'f':
		return s.literal("false")
	case c == 'n':
		return s.literal("null")
	case c == '-' || (c >= '0' && c <= '9'):
		return s.number()
	}
	return s.syntax("unexpected character")
}

func (s *jsonScanner) literal(lit string) error {
	if len(s.b)-s.i < len(lit) || string(s.b[s.i:s.i+len(lit)]) != lit {
		return s.syntax("unexpected character")
	}
	s.i += len(lit)
	return nil
}

func (s *jsonScanner) enter() error {
	s.depth++
	if s.depth > s.max {
		return invalid("JSON nested deeper than %d levels (at byte %d)", s.max, s.i)
	}
	s.i++
	return nil
}

func (s *jsonScanner) object() error {
	if err := s.enter(); err != nil {
		return err
	}
	s.space()
	if s.i < len(s.b) && s.b[s.i] == '}' {
		s.i++
		s.depth--
		return nil
	}
	for {
		if s.i >= len(s.b) || s.b[s.i] != '"' {
			return s.syntax("expected a string key")
		}
		if err := s.str(); err != nil {
			return err
		}
		s.space()
		if s.i >= len(s.b) || s.b[s.i] != ':' {
			return s.syntax("expected ':' after an object key")
		}
		s.i++
		s.space()
		if err := s.value(); err != nil {
			return err
		}
		s.space()
		if s.i < len(s.b) {
			switch s.b[s.i] {
			case ',':
				s.i++
				s.space()
				continue
			case '}':
				s.i++
				s.depth--
				return nil
			}
		}
		return s.syntax("expected ',' or '}' in an object")
	}
}

func (s *jsonScanner) array() error {
	if err := s.enter(); err != nil {
		return err
	}
	s.space()
	if s.i < len(s.b) && s.b[s.i] == ']' {
		s.i++
		s.depth--
		return nil
	}
	for {
		if err := s.value(); err != nil {
			return err
		}
		s.space()
		if s.i < len(s.b) {
			switch s.b[s.i] {
			case ',':
				s.i++
				s.space()
				continue
			case ']':
				s.i++
				s.depth--
				return nil
			}
		}
		return s.syntax("expected ',' or ']' in an array")
	}
}

// str scans a string starting at its opening quote.
func (s *jsonScanner) str() error {
	s.i++
	for {
		// The common case: a run of printable ASCII.
		b, i := s.b, s.i
		for i < len(b) {
			if c := b[i]; c < 0x20 || c == '"' || c == '\\' || c >= utf8.RuneSelf {
				break
			}
			i++
		}
		s.i = i
		if s.i >= len(s.b) {
			return s.syntax("unterminated string")
		}
		switch c := s.b[s.i]; {
		case c == '"':
			s.i++
			return nil
		case c == '\\':
			if err := s.escape(); err != nil {
				return err
			}
		case c < 0x20:
			return s.syntax("control character in a string")
		default:
			r, size := utf8.DecodeRune(s.b[s.i:])
			if r == utf8.RuneError && size <= 1 {
				return invalid("JSON string holds invalid UTF-8 (at byte %d)", s.i)
			}
			s.i += size
		}
	}
}

// escape scans one escape sequence starting at its backslash.
func (s *jsonScanner) escape() error {
	if s.i+1 >= len(s.b) {
		return s.syntax("unterminated escape")
	}
	switch s.b[s.i+1] {
	case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
		s.i += 2
		return nil
	case 'u':
	default:
		return s.syntax("invalid escape")
	}
	r, ok := s.hex4(s.i + 2)
	if !ok {
		return s.syntax(`invalid \u escape`)
	}
	at := s.i
	s.i += 6
	switch {
	case r >= 0xdc00 && r <= 0xdfff:
		return invalid("JSON string holds an unpaired surrogate escape (at byte %d)", at)
	case r >= 0xd800 && r < 0xdc00:
		if s.i+1 < len(s.b) && s.b[s.i] == '\\' && s.b[s.i+1] == 'u' {
			if lo, ok := s.hex4(s.i + 2); ok && lo >= 0xdc00 && lo <= 0xdfff {
				s.i += 6
				return nil
			}
		}
		return invalid("JSON string holds an unpaired surrogate escape (at byte %d)", at)
	}
	return nil
}

func (s *jsonScanner) hex4(at int) (rune, bool) {
	if at+4 > len(s.b) {
		return 0, false
	}
	var r rune
	for _, c := range s.b[at : at+4] {
		switch {
		case c >= '0' && c <= '9':
			r = r<<4 | rune(c-'0')
		case c >= 'a' && c <= 'f':
			r = r<<4 | rune(c-'a'+10)
		case c >= 'A' && c <= 'F':
			r = r<<4 | rune(c-'A'+10)
		default:
			return 0, false
		}
	}
	return r, true
}

// number scans a number and refuses one that overflows float64. Its decimal
// magnitude is estimated on the way; only a number that may reach 1e308
// (rare) is parsed to decide.
func (s *jsonScanner) number() error {
	start := s.i
	if s.b[s.i] == '-' {
		s.i++
	}
	digits := func() int {
		b, i := s.b, s.i
		for i < len(b) && b[i]-'0' <= 9 {
			i++
		}
		n := i - s.i
		s.i = i
		return n
	}
	if s.i >= len(s.b) || s.b[s.i] < '0' || s.b[s.i] > '9' {
		return s.syntax("invalid number")
	}
	// mag is the decimal exponent of the first significant digit; zero
	// reports a number without one (its value is 0).
	mag, zero := 0, true
	if s.b[s.i] == '0' {
		s.i++
	} else {
		mag, zero = digits()-1, false
	}
	if s.i < len(s.b) && s.b[s.i] == '.' {
		s.i++
		fracStart := s.i
		if digits() == 0 {
			return s.syntax("invalid number: no digits after the decimal point")
		}
		if zero {
			for j := fracStart; j < s.i; j++ {
				if s.b[j] != '0' {
					mag, zero = fracStart-j-1, false
					break
				}
			}
		}
	}
	if s.i < len(s.b) && (s.b[s.i] == 'e' || s.b[s.i] == 'E') {
		s.i++
		neg := false
		if s.i < len(s.b) && (s.b[s.i] == '+' || s.b[s.i] == '-') {
			neg = s.b[s.i] == '-'
			s.i++
		}
		e, n := 0, 0
		for s.i < len(s.b) && s.b[s.i] >= '0' && s.b[s.i] <= '9' {
			if e < 1<<20 {
				e = e*10 + int(s.b[s.i]-'0')
			}
			s.i++
			n++
		}
		if n == 0 {
			return s.syntax("invalid number: no digits in the exponent")
		}
		if neg {
			e = -e
		}
		mag += e
	}
	if !zero && mag >= 307 {
		f, _ := strconv.ParseFloat(string(s.b[start:s.i]), 64)
		if math.IsInf(f, 0) {
			return invalid("JSON number out of range: not a finite float64 (at byte %d)", start)
		}
	}
	return nil
}
