package wire

import (
	"errors"
	"fmt"
	"strconv"
	"time"
)

// Query parameters of the consumer APIs, parsed the same way at the edge and
// at the cloud: the Fiber handlers on both sides pass the raw strings here
// and answer 400 with the error's message when it matches ErrBadParam.

// ErrBadParam marks a malformed query parameter.
var ErrBadParam = errors.New("bad query parameter")

// BadParam is the error for a malformed parameter name.
func BadParam(name, format string, a ...any) error {
	return &ruleError{kind: ErrBadParam, msg: name + ": " + fmt.Sprintf(format, a...)}
}

// maxTimeMs is the largest time accepted, 2^53 ms: exact in JavaScript.
const maxTimeMs = 1 << 53

// ParseTime reads a time given as Unix milliseconds or RFC 3339; "" is 0
// (unbounded).
func ParseTime(name, s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		if n < 0 || n > maxTimeMs {
			return 0, BadParam(name, "%d is out of range for Unix milliseconds", n)
		}
		return n, nil
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return 0, BadParam(name, "%q is neither Unix milliseconds nor an RFC 3339 time", clip(s))
	}
	ms := t.UnixMilli()
	if ms < 0 || ms > maxTimeMs {
		return 0, BadParam(name, "%q is out of range (1970 to year 287396)", clip(s))
	}
	return ms, nil
}

// ParseLimit reads a page size: def when s is empty, otherwise an integer
// from 1 to max.
func ParseLimit(s string, def, max int) (int, error) {
	if s == "" {
		return def, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		return 0, BadParam("limit", "%q must be a positive integer", clip(s))
	}
	if n > max {
		return 0, BadParam("limit", "%d exceeds the maximum page size %d", n, max)
	}
	return n, nil
}

// MaxCursor bounds an opaque cursor's length.
const MaxCursor = 512

// ParseCursor checks an opaque page cursor's form (at most MaxCursor
// printable ASCII characters); whether it names a real position is the
// store's to decide.
func ParseCursor(s string) (string, error) {
	if len(s) > MaxCursor {
		return "", BadParam("cursor", "longer than %d bytes", MaxCursor)
	}
	for i := 0; i < len(s); i++ {
		if s[i] <= 0x20 || s[i] >= 0x7f {
			return "", BadParam("cursor", "%q is not a cursor this server issued", clip(s))
		}
	}
	return s, nil
}

// ParseLocation reads a latitude and a longitude in degrees; both are
// required and must be finite and in range.
func ParseLocation(lat, lng string) (Location, error) {
	if lat == "" || lng == "" {
		return Location{}, BadParam("lat/lng", "both lat and lng are required")
	}
	la, err := strconv.ParseFloat(lat, 64)
	if err != nil || !validLat(la) {
		return Location{}, BadParam("lat", "%q must be a number between -90 and 90", clip(lat))
	}
	ln, err := strconv.ParseFloat(lng, 64)
	if err != nil || !validLng(ln) {
		return Location{}, BadParam("lng", "%q must be a number between -180 and 180", clip(lng))
	}
	return Location{Lat: la, Lng: ln}, nil
}

// Written as "in range" so that NaN, which compares false with everything,
// is refused; ±Inf is out of range.
func validLat(v float64) bool { return v >= -90 && v <= 90 }
func validLng(v float64) bool { return v >= -180 && v <= 180 }

// Valid reports whether l is a finite WGS-84 position.
func (l Location) Valid() bool { return validLat(l.Lat) && validLng(l.Lng) }
