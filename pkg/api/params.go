package api

import (
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/outpost-edge/outpost/pkg/ident"
)

// errParam marks a malformed query parameter; handlers answer 400 with it.
var errParam = errors.New("bad parameter")

func paramErr(name, format string, args ...any) error {
	return fmt.Errorf("%w: %s: %s", errParam, name, fmt.Sprintf(format, args...))
}

// parseTime reads a time given as Unix milliseconds or RFC 3339.
func parseTime(name, s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		if n < 0 || n > 1<<53 {
			return 0, paramErr(name, "%d is out of range for Unix milliseconds", n)
		}
		return n, nil
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return 0, paramErr(name, "%q is neither Unix milliseconds nor an RFC 3339 time", truncate(s))
	}
	ms := t.UnixMilli()
	if ms < 0 {
		return 0, paramErr(name, "%q is before 1970", truncate(s))
	}
	return ms, nil
}

// parseLimit reads a page size, defaulting to def and capped at max.
func parseLimit(s string, def, max int) (int, error) {
	if s == "" {
		return def, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		return 0, paramErr("limit", "%q must be a positive integer", truncate(s))
	}
	if n > max {
		return 0, paramErr("limit", "%d exceeds the maximum page size %d", n, max)
	}
	return n, nil
}

// parseStep reads a stats period as a Go duration ("5m") or milliseconds.
func parseStep(s string) (int64, error) {
	if s == "" {
		return 0, nil
	}
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		if n < 1 {
			return 0, paramErr("step", "must be at least 1 ms")
		}
		return n, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, paramErr("step", "%q is neither milliseconds nor a duration like 5m", truncate(s))
	}
	if d < time.Millisecond {
		return 0, paramErr("step", "must be at least 1ms")
	}
	return d.Milliseconds(), nil
}

// parseLatLng reads a latitude and longitude in degrees.
func parseLatLng(lat, lng string) (float64, float64, error) {
	if lat == "" || lng == "" {
		return 0, 0, paramErr("lat/lng", "both lat and lng are required")
	}
	// Written as !(in range) so that NaN, which compares false with
	// everything, is refused too.
	la, err := strconv.ParseFloat(lat, 64)
	if err != nil || !(la >= -90 && la <= 90) {
		return 0, 0, paramErr("lat", "%q must be a number between -90 and 90", truncate(lat))
	}
	ln, err := strconv.ParseFloat(lng, 64)
	if err != nil || !(ln >= -180 && ln <= 180) {
		return 0, 0, paramErr("lng", "%q must be a number between -180 and 180", truncate(lng))
	}
	return la, ln, nil
}

// validMetric matches metric names as the ingest decoder accepts them.
func validMetric(s string) bool { return ident.Valid(s, 64) }

func truncate(s string) string {
	if len(s) > 64 {
		return s[:64] + "…"
	}
	return s
}
