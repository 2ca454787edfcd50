package api

import (
	"encoding/json"
	"math"
	"strconv"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/store"
)

// TestAppendReading: the hand-rolled encoder of the hot read path emits
// valid JSON that round-trips, whatever the message id holds.
func TestAppendReading(t *testing.T) {
	ids := []string{"", "m1", `q"uote`, `back\slash`, "ctl\x00\x01\x1f", "tab\tnl\n", "ünïcödé", "\u2028sep", "\xff\xfeinvalid", "</script>", "\x7f"}
	for _, id := range ids {
		r := store.Reading{TS: 1732170000123, ID: id, Metrics: []store.Metric{
			{Name: "temp", Value: 21.5}, {Name: "big", Value: 1e300}, {Name: "tiny", Value: -5e-324},
			{Name: "nan", Value: math.NaN()}, {Name: "inf", Value: math.Inf(-1)},
		}}
		b := appendReading(nil, r)
		var got struct {
			TS      int64               `json:"ts"`
			ID      string              `json:"id"`
			Metrics map[string]*float64 `json:"metrics"`
		}
		if err := json.Unmarshal(b, &got); err != nil {
			t.Fatalf("id %q: invalid JSON %s: %v", id, b, err)
		}
		want, _ := json.Marshal(id) // invalid UTF-8 becomes U+FFFD, as encoding/json does
		var wantID string
		_ = json.Unmarshal(want, &wantID)
		if got.TS != r.TS || got.ID != wantID || *got.Metrics["temp"] != 21.5 || *got.Metrics["big"] != 1e300 ||
			got.Metrics["nan"] != nil || got.Metrics["inf"] != nil {
			t.Fatalf("id %q: round trip %s", id, b)
		}
	}
}

func TestCachesEvict(t *testing.T) {
	now := time.Unix(1732170000, 0)
	clock := func() time.Time { return now }
	tc := newTokenCache(time.Minute, 16, clock)
	uc := newUserCache(time.Second, 16, clock)
	for i := range 100 {
		k := "k" + strconv.Itoa(i)
		tc.put(k, auth.Claims{OpenID: k, ExpiresAt: now.Add(time.Hour)})
		uc.put(k, []string{"viewer"}, nil)
		if tc.m.Len() > 16 || uc.m.Len() > 16 {
			t.Fatalf("caches grew to %d and %d entries, max 16", tc.m.Len(), uc.m.Len())
		}
		if c, ok := tc.get(k); !ok || c.OpenID != k {
			t.Fatalf("token %s not cached", k)
		}
		if _, ok := uc.get(k); !ok {
			t.Fatalf("user %s not cached", k)
		}
	}
	// Expiry: the token's own exp bounds its entry.
	tc.put("short", auth.Claims{OpenID: "s", ExpiresAt: now.Add(time.Second)})
	now = now.Add(2 * time.Second)
	if _, ok := tc.get("short"); ok {
		t.Fatal("expired token served from cache")
	}
	if _, ok := uc.get("k99"); ok {
		t.Fatal("stale user served from cache")
	}
	tc.put(string(make([]byte, maxCachedTokenLen+1)), auth.Claims{ExpiresAt: now.Add(time.Hour)})
	if _, ok := tc.get(string(make([]byte, maxCachedTokenLen+1))); ok {
		t.Fatal("over-long token cached")
	}
	// Disabled caches are nil and inert.
	var off *tokenCache = newTokenCache(-1, 16, clock)
	off.put("x", auth.Claims{})
	if _, ok := off.get("x"); ok {
		t.Fatal("disabled cache served")
	}
	var uoff *userCache = newUserCache(-1, 16, clock)
	uoff.put("x", nil, nil)
	uoff.forget("x")
	if _, ok := uoff.get("x"); ok {
		t.Fatal("disabled cache served")
	}
}

func TestLimiterSweep(t *testing.T) {
	l := newLimiter(1)
	for _, k := range []string{"a", "b", "c"} {
		if ok, _ := l.allow(k); !ok {
			t.Fatalf("first request of %s refused", k)
		}
	}
	l.sweep(time.Hour)
	if len(l.m) != 3 {
		t.Fatalf("sweep of fresh entries left %d", len(l.m))
	}
	l.sweep(-time.Second) // everything is idle longer than -1 s
	if len(l.m) != 0 {
		t.Fatalf("sweep left %d idle entries", len(l.m))
	}
	var none *limiter
	none.sweep(0)
	if ok, _ := none.allow("x"); !ok {
		t.Fatal("disabled limiter refused")
	}
}

func TestNewRequiresDeps(t *testing.T) {
	e := newEnv(t)
	full := Deps{Store: e.store, Tokens: e.tokens, Policy: e.engine}
	for name, d := range map[string]Deps{
		"no store":  {Tokens: full.Tokens, Policy: full.Policy},
		"no tokens": {Store: full.Store, Policy: full.Policy},
		"no policy": {Store: full.Store, Tokens: full.Tokens},
	} {
		if _, err := New(Config{}, d); err == nil {
			t.Fatalf("%s: New succeeded", name)
		}
	}
	if _, err := New(Config{}, full); err != nil {
		t.Fatalf("minimal deps: %v", err)
	}
}
