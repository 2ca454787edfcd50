package api

import (
	"errors"
	"strings"
	"testing"

	"github.com/outpost-edge/outpost/pkg/ident"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// FuzzParams drives every query-parameter parser with the same input and
// checks their contracts: no panic; an accepted value is in range; a refusal
// wraps wire.ErrBadParam (so handlers answer 400) and quotes at most a bounded
// excerpt of the input.
func FuzzParams(f *testing.F) {
	for _, s := range []string{
		"", "0", "1", "-1", "+5", "1732170000123", "9007199254740992", "9007199254740993", "99999999999999999999",
		"2024-11-21T06:20:00Z", "2024-11-21T06:20:00.123+08:00", "1969-12-31T23:59:59Z", "0000-01-01T00:00:00Z",
		"9999-12-31T23:59:59.999999999Z", "2024-13-01T00:00:00Z", "5m", "1h30m", "1ms", "999us", "-5m", "0s",
		"2562047h47m16.854775807s", "NaN", "nan", "Inf", "-Inf", "1e400", "90", "-90.0", "180", "180.0000001",
		"0x1p-2", "1_000", "..", ".", "...", "a..b", "%2e%2e", "../etc", "a/b", "a\\b", "a\x00b", "a\nb", "é",
		strings.Repeat("a", 64), strings.Repeat("a", 65), strings.Repeat("o", 128), strings.Repeat("o", 129),
	} {
		f.Add(s, s)
	}
	f.Add("31.2", "121.5")
	f.Add("NaN", "0")
	f.Add("0", "nan")
	f.Fuzz(func(t *testing.T, a, b string) {
		checkErr := func(what string, err error) {
			t.Helper()
			if !errors.Is(err, wire.ErrBadParam) {
				t.Fatalf("%s: error %v does not wrap wire.ErrBadParam", what, err)
			}
			// Messages quote the input truncated; they stay bounded.
			if len(err.Error()) > 512 {
				t.Fatalf("%s: %d-byte message", what, len(err.Error()))
			}
		}
		if ms, err := wire.ParseTime("from", a); err != nil {
			checkErr("parseTime", err)
		} else if ms < 0 || ms > 1<<53 || (a == "" && ms != 0) {
			t.Fatalf("parseTime(%q) = %d", a, ms)
		}
		if n, err := wire.ParseLimit(a, 100, 1000); err != nil {
			checkErr("parseLimit", err)
		} else if n < 1 || n > 1000 || (a == "" && n != 100) {
			t.Fatalf("parseLimit(%q) = %d", a, n)
		}
		if step, err := parseStep(a); err != nil {
			checkErr("parseStep", err)
		} else if a != "" && step < 1 || a == "" && step != 0 {
			t.Fatalf("parseStep(%q) = %d", a, step)
		}
		if cur, err := wire.ParseCursor(a); err != nil {
			checkErr("ParseCursor", err)
		} else if cur != a || len(cur) > wire.MaxCursor {
			t.Fatalf("ParseCursor(%q) = %q", a, cur)
		}
		if l, err := wire.ParseLocation(a, b); err != nil {
			checkErr("ParseLocation", err)
		} else if !(l.Lat >= -90 && l.Lat <= 90 && l.Lng >= -180 && l.Lng <= 180) {
			t.Fatalf("ParseLocation(%q, %q) = %v", a, b, l)
		} else if d := wire.DistanceKm(l, wire.Location{}); !(d >= 0 && d <= 20016) {
			t.Fatalf("DistanceKm(%v) = %v", l, d)
		}
		if ident.Valid(a, 64) {
			if len(a) < 1 || len(a) > 64 || a == "." || a == ".." || strings.ContainsAny(a, "/\\%\x00 ") {
				t.Fatalf("validID(%q)", a)
			}
			for _, c := range []byte(a) {
				if c < 0x21 || c > 0x7e {
					t.Fatalf("validID(%q) accepts byte %#x", a, c)
				}
			}
		}
		if ident.OpenID(a) {
			if len(a) < 1 || len(a) > 128 || strings.Contains(a, "..") || strings.ContainsAny(a, "/\\%") {
				t.Fatalf("validOpenID(%q)", a)
			}
			for _, c := range []byte(a) {
				if c < 0x21 || c > 0x7e {
					t.Fatalf("validOpenID(%q) accepts byte %#x", a, c)
				}
			}
		}
	})
}
