package wire

import (
	"math"
	"math/rand/v2"
	"strconv"
	"testing"
)

// strconvJSONFloat is encoding/json's formatting of a float64, through
// strconv alone: the reference appendJSONFloat must match byte for byte.
func strconvJSONFloat(f float64) string {
	abs := math.Abs(f)
	format := byte('f')
	if abs != 0 && (abs < 1e-6 || abs >= 1e21) {
		format = 'e'
	}
	b := strconv.AppendFloat(nil, f, format, -1, 64)
	if format == 'e' {
		if n := len(b); n >= 4 && b[n-4] == 'e' && b[n-3] == '-' && b[n-2] == '0' {
			b[n-2] = b[n-1]
			b = b[:n-1]
		}
	}
	return string(b)
}

// TestJSONFloatShortDecimals: the short-decimal path writes what strconv
// writes, for decimals of up to six fractional digits (the path takes up
// to four), their neighbours, and random doubles.
func TestJSONFloatShortDecimals(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	check := func(f float64) {
		t.Helper()
		if got, want := string(appendJSONFloat(nil, f)), strconvJSONFloat(f); got != want {
			t.Fatalf("%v (bits %x): %s, strconv %s", f, math.Float64bits(f), got, want)
		}
	}
	fast := 0
	for range 150_000 {
		k := rng.IntN(7)
		n := rng.Int64N(1 << uint(1+rng.IntN(52)))
		f := float64(n) / math.Pow(10, float64(k))
		if rng.IntN(2) == 0 {
			f = -f
		}
		for _, g := range []float64{f, math.Nextafter(f, math.Inf(1)), math.Nextafter(f, math.Inf(-1))} {
			check(g)
			if _, ok := appendShortDecimal(nil, g); ok {
				fast++
			}
		}
		check(math.Float64frombits(rng.Uint64()))
		check(rng.NormFloat64() * math.Pow(10, float64(rng.IntN(30)-10)))
	}
	for _, f := range []float64{0, math.Copysign(0, -1), 0.1, 0.2, 0.1 + 0.2, 1e-4, 9.999e-5, 0.0001, 1 << 40, 1<<40 - 1, 1<<40 + 0.5,
		1013.25, 21.5, 40, 99.99, 1.0001, 123456.7891, 0.3, 2.675, 1.005, 4.35, 0.015625} {
		check(f)
		check(-f)
	}
	if fast < 40_000 {
		t.Fatalf("only %d values took the short-decimal path", fast)
	}
}

// FuzzJSONFloat: appendJSONFloat writes what encoding/json writes, for
// any finite double.
func FuzzJSONFloat(f *testing.F) {
	for _, v := range []float64{21.5, 0.1, 1013.25, -40, 1e-4, 1 << 40, 2.675} {
		f.Add(v)
	}
	f.Fuzz(func(t *testing.T, v float64) {
		if math.IsNaN(v) || math.IsInf(v, 0) {
			return
		}
		if got, want := string(appendJSONFloat(nil, v)), strconvJSONFloat(v); got != want {
			t.Fatalf("%v: %s, strconv %s", v, got, want)
		}
	})
}

// TestShortDecimalParse: the push decoder's short-decimal path reads what
// strconv.ParseFloat reads, to the bit, and leaves alone what it must.
func TestShortDecimalParse(t *testing.T) {
	rng := rand.New(rand.NewPCG(13, 14))
	check := func(s string) {
		t.Helper()
		d := pushDecoder{b: []byte(s)}
		got, ok := d.shortDecimal()
		if !ok {
			return
		}
		want, err := strconv.ParseFloat(s[:d.i], 64)
		if err != nil || math.Float64bits(got) != math.Float64bits(want) {
			t.Fatalf("%q: %v (%x), ParseFloat %v (%x, %v)", s, got, math.Float64bits(got), want, math.Float64bits(want), err)
		}
	}
	taken := 0
	for range 200_000 {
		n := 1 + rng.IntN(15)
		k := rng.IntN(n)
		digits := make([]byte, n)
		for i := range digits {
			digits[i] = byte('0' + rng.IntN(10))
		}
		if n-k > 1 && digits[0] == '0' {
			digits[0] = '1'
		}
		s := string(digits[:n-k])
		if k > 0 {
			s += "." + string(digits[n-k:])
		}
		if rng.IntN(2) == 0 {
			s = "-" + s
		}
		check(s)
		d := pushDecoder{b: []byte(s)}
		if _, ok := d.shortDecimal(); ok {
			taken++
		}
	}
	if taken < 100_000 {
		t.Fatalf("only %d decimals took the path", taken)
	}
	for _, s := range []string{"0", "-0", "-0.0", "0.1", "0.3", "21.5", "999999999999999", "99999999999999.9", "0.000000000000001"} {
		check(s)
	}
	for _, s := range []string{"01", "1.", "-", "1e5", "1.5E3", "9999999999999999", "0.0000000000000001", ".5"} {
		d := pushDecoder{b: []byte(s)}
		if _, ok := d.shortDecimal(); ok {
			t.Errorf("%q taken", s)
		}
	}
	d := pushDecoder{b: []byte("-0")}
	if f, _ := d.shortDecimal(); !math.Signbit(f) {
		t.Error("-0 lost its sign")
	}
}
