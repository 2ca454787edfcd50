package rules

import (
	"encoding/json"
	"errors"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/wire"
)

func mustCompile(t *testing.T, r Rule) *Compiled {
	t.Helper()
	c, err := Compile(r)
	if err != nil {
		t.Fatalf("compile %+v: %v", r, err)
	}
	return c
}

// TestCompileRefusals: every bad rule is refused with ErrInvalid (400 at
// both APIs) and a message naming the problem, the compiler's for a bad
// expression.
func TestCompileRefusals(t *testing.T) {
	long := strings.Repeat("a", MaxExprLen+1)
	for _, tc := range []struct {
		name string
		r    Rule
		want string
	}{
		{"no name", Rule{When: "temp > 1"}, "rule name"},
		{"bad name", Rule{Name: "a/b", When: "temp > 1"}, "rule name"},
		{"no when", Rule{Name: "r"}, "when is required"},
		{"syntax", Rule{Name: "r", When: "temp >"}, "when:"},
		{"not boolean", Rule{Name: "r", When: "temp + 1"}, "when:"},
		{"metric against a string", Rule{Name: "r", When: `temp > "x"`}, "when:"},
		{"bad clear", Rule{Name: "r", When: "temp > 1", Clear: "temp <"}, "clear:"},
		{"too long", Rule{Name: "r", When: long}, "longer than"},
		{"negative for", Rule{Name: "r", When: "temp > 1", For: Duration(-time.Second)}, "negative"},
		{"severity", Rule{Name: "r", When: "temp > 1", Severity: "doom"}, "severity"},
		{"bad device id", Rule{Name: "r", When: "temp > 1", Devices: Selector{IDs: []string{"a b"}}}, "devices.ids"},
		{"bad region", Rule{Name: "r", When: "temp > 1", Devices: Selector{Region: "no/pe"}}, "region"},
		{"empty action", Rule{Name: "r", When: "temp > 1", Actions: []Action{{}}}, "empty action"},
		{"two in one action", Rule{Name: "r", When: "temp > 1", Actions: []Action{{Notify: true,
			SetDesired: map[string]json.RawMessage{"fan": []byte(`"on"`)}}}}, "one of"},
		{"bad desired value", Rule{Name: "r", When: "temp > 1", Actions: []Action{{
			SetDesired: map[string]json.RawMessage{"fan": []byte(`{`)}}}}, "set_desired"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Compile(tc.r)
			if !errors.Is(err, ErrInvalid) || !errors.Is(err, wire.ErrInvalid) {
				t.Fatalf("Compile = %v, want ErrInvalid", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Compile = %q, want it to mention %q", err, tc.want)
			}
		})
	}
}

// TestExpressions: what a condition sees, and that a reading lacking a
// metric the rule names does not evaluate it.
func TestExpressions(t *testing.T) {
	dev := Device{ID: "dev-1", Region: "north", Tags: map[string]string{"site": "lab"},
		Reported: map[string]any{"door": "open", "mode": 2.0}}
	for _, tc := range []struct {
		when    string
		metrics map[string]float64
		fires   bool
	}{
		{"temp > 30", map[string]float64{"temp": 31}, true},
		{"temp > 30", map[string]float64{"temp": 30}, false},
		{"temp > 30", map[string]float64{"humidity": 99}, false}, // temp missing: not evaluated
		{"temp > 30 && humidity < 80", map[string]float64{"temp": 31, "humidity": 50}, true},
		{"temp > 30 || humidity < 80", map[string]float64{"temp": 31}, false}, // humidity missing
		{`metrics["temp-2"] > 1`, map[string]float64{"temp-2": 2}, true},
		{`device.tags.site == "lab" && temp > 0`, map[string]float64{"temp": 1}, true},
		{`device.id == "dev-2"`, map[string]float64{"temp": 1}, false},
		{`device.reported.door == "open"`, map[string]float64{"x": 1}, true},
		{`abs(temp) > 5`, map[string]float64{"temp": -6}, true},
	} {
		for name, d := range map[string]Device{"device": dev, "prepared": dev.Prepared()} {
			t.Run(name+"/"+tc.when, func(t *testing.T) {
				c := mustCompile(t, Rule{Name: "r", When: tc.when})
				e := newTestEngine(t, c)
				evs, errs := e.Evaluate(time.UnixMilli(1000), d, tc.metrics)
				if len(errs) > 0 {
					t.Fatal(errs)
				}
				if got := len(evs) == 1 && evs[0].Kind == Fired; got != tc.fires {
					t.Fatalf("events %v, want fired=%v", kinds(evs), tc.fires)
				}
			})
		}
	}
}

// TestRuntimeErrorSkips: a rule failing at run time (a reported field that
// is not a number) is skipped with an error; the other rules still run.
func TestRuntimeErrorSkips(t *testing.T) {
	bad := mustCompile(t, Rule{Name: "bad", When: `device.reported.door > 1`})
	good := mustCompile(t, Rule{Name: "good", When: `temp > 1`})
	e := newTestEngine(t, bad, good)
	evs, errs := e.Evaluate(time.UnixMilli(1), Device{ID: "d", Reported: map[string]any{"door": "open"}},
		map[string]float64{"temp": 2})
	if len(errs) != 1 || !strings.Contains(errs[0].Error(), "rule bad") {
		t.Fatalf("errors %v, want one for rule bad", errs)
	}
	if len(evs) != 1 || evs[0].Rule.Name != "good" || evs[0].Kind != Fired {
		t.Fatalf("events %v, want good fired", kinds(evs))
	}
}

func TestSelector(t *testing.T) {
	d := Device{ID: "dev-1", Region: "north", Tags: map[string]string{"site": "lab", "floor": "2"}}
	for _, tc := range []struct {
		s    Selector
		want bool
	}{
		{Selector{}, true},
		{Selector{IDs: []string{"dev-1", "dev-2"}}, true},
		{Selector{IDs: []string{"dev-2"}}, false},
		{Selector{Region: "north"}, true},
		{Selector{Region: "south"}, false},
		{Selector{Tags: map[string]string{"site": "lab"}}, true},
		{Selector{Tags: map[string]string{"site": "lab", "floor": "3"}}, false},
		{Selector{Tags: map[string]string{"room": ""}}, false},
		{Selector{IDs: []string{"dev-1"}, Region: "north", Tags: map[string]string{"floor": "2"}}, true},
	} {
		if got := tc.s.Matches(d); got != tc.want {
			t.Errorf("%+v.Matches = %v, want %v", tc.s, got, tc.want)
		}
	}
}

type clock struct{ n uint16 }

func (c *clock) stamp() hlc.Timestamp { c.n++; return hlc.New(1, c.n) }

func newTestEngine(t *testing.T, cs ...*Compiled) *Engine {
	t.Helper()
	e := NewEngine(nil, (&clock{}).stamp)
	e.Swap(time.UnixMilli(0), Set(cs))
	return e
}

func kinds(evs []Event) []string {
	var out []string
	for _, e := range evs {
		out = append(out, e.Kind.String())
	}
	return out
}

// step is one input to the engine at a time (ms): a reading of temp, a
// tick, or an ack; want is the events it produces.
type step struct {
	at   int64
	temp *float64
	ack  bool
	want []EventKind
}

func temp(v float64) *float64 { return &v }

// TestForAndClear: `for` and `clear` timing with an injected clock.
func TestForAndClear(t *testing.T) {
	for _, tc := range []struct {
		name  string
		rule  Rule
		steps []step
	}{
		{"no for fires at once, default clear is not when", Rule{When: "temp > 30"}, []step{
			{at: 0, temp: temp(31), want: []EventKind{Fired}},
			{at: 10, temp: temp(35)}, // one active alert per rule and device
			{at: 20, temp: temp(30), want: []EventKind{Cleared}},
			{at: 30, temp: temp(31), want: []EventKind{Fired}}, // a new alert
		}},
		{"for must hold", Rule{When: "temp > 30", For: Duration(30 * time.Second)}, []step{
			{at: 0, temp: temp(31), want: []EventKind{Pending}},
			{at: 29_999, temp: temp(32)},
			{at: 30_000, temp: temp(33), want: []EventKind{Fired}},
		}},
		{"a dip resets for", Rule{When: "temp > 30", For: Duration(30 * time.Second)}, []step{
			{at: 0, temp: temp(31), want: []EventKind{Pending}},
			{at: 20_000, temp: temp(29), want: []EventKind{Reset}},
			{at: 30_000, temp: temp(31), want: []EventKind{Pending}},
			{at: 59_999, temp: temp(31)},
			{at: 60_000, want: []EventKind{Fired}}, // by the tick: no reading needed
		}},
		{"tick fires a silent device", Rule{When: "temp > 30", For: Duration(time.Minute)}, []step{
			{at: 0, temp: temp(31), want: []EventKind{Pending}},
			{at: 59_000},
			{at: 60_000, want: []EventKind{Fired}},
			{at: 120_000},
		}},
		{"hysteresis with clear", Rule{When: "temp > 30", Clear: "temp < 28"}, []step{
			{at: 0, temp: temp(31), want: []EventKind{Fired}},
			{at: 1, temp: temp(29)}, // not when, but not clear either
			{at: 2, temp: temp(30.5)},
			{at: 3, temp: temp(27), want: []EventKind{Cleared}},
		}},
		{"ack keeps it open until clear", Rule{When: "temp > 30"}, []step{
			{at: 0, temp: temp(31), want: []EventKind{Fired}},
			{at: 5, ack: true, want: []EventKind{Changed}},
			{at: 6, ack: true, want: []EventKind{Changed}}, // the later ack wins
			{at: 7, temp: temp(31)},
			{at: 8, temp: temp(1), want: []EventKind{Cleared}},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.rule.Name = "hot"
			e := newTestEngine(t, mustCompile(t, tc.rule))
			dev := Device{ID: "freezer"}
			var open string
			for i, st := range tc.steps {
				now := time.UnixMilli(st.at)
				var evs []Event
				switch {
				case st.ack:
					ev, ok := e.Ack(open, "alice", st.at)
					if ok {
						evs = []Event{ev}
					}
				case st.temp != nil:
					var errs []error
					evs, errs = e.Evaluate(now, dev, map[string]float64{"temp": *st.temp})
					if len(errs) > 0 {
						t.Fatal(errs)
					}
				default:
					evs = e.Tick(now)
				}
				if got := kinds(evs); strings.Join(got, ",") != joinKinds(st.want) {
					t.Fatalf("step %d (at %d): events %v, want %v", i, st.at, got, joinKinds(st.want))
				}
				for _, ev := range evs {
					if ev.Kind == Fired {
						open = ev.Alert.ID
						if ev.Alert.StartedAt != st.at || ev.Alert.State != StateActive {
							t.Fatalf("step %d: fired %+v", i, ev.Alert)
						}
					}
					if ev.Kind == Cleared && (ev.Alert.ClearedAt != st.at || ev.Alert.State != StateCleared) {
						t.Fatalf("step %d: cleared %+v", i, ev.Alert)
					}
				}
			}
		})
	}
}

func joinKinds(ks []EventKind) string {
	var out []string
	for _, k := range ks {
		out = append(out, k.String())
	}
	return strings.Join(out, ",")
}

// TestRestartMidFor: the pending state, saved as the engine handed it out,
// resumes in a new engine, and its alert fires on time with no new reading.
func TestRestartMidFor(t *testing.T) {
	rule := Rule{Name: "cold", When: "temp > -5", For: Duration(10 * time.Minute), Actions: []Action{{Notify: true}}}
	e := newTestEngine(t, mustCompile(t, rule))
	evs, _ := e.Evaluate(time.UnixMilli(1_000), Device{ID: "freezer"}, map[string]float64{"temp": -2})
	if len(evs) != 1 || evs[0].Kind != Pending {
		t.Fatalf("events %v", kinds(evs))
	}
	// What the runner persisted, through JSON as the store keeps it.
	saved, err := json.Marshal(evs[0].State)
	if err != nil {
		t.Fatal(err)
	}
	var st State
	if err := json.Unmarshal(saved, &st); err != nil {
		t.Fatal(err)
	}
	// Restart: the rule compiles to the same version.
	e2 := NewEngine([]State{st}, (&clock{}).stamp)
	if evs := e2.Swap(time.UnixMilli(2_000), Set{mustCompile(t, rule)}); len(evs) != 0 {
		t.Fatalf("swap to the same rule: %v", kinds(evs))
	}
	if due := e2.NextDue(); due.UnixMilli() != 601_000 {
		t.Fatalf("NextDue %v, want 601000 ms", due.UnixMilli())
	}
	if evs := e2.Tick(time.UnixMilli(600_999)); len(evs) != 0 {
		t.Fatalf("early tick: %v", kinds(evs))
	}
	evs = e2.Tick(time.UnixMilli(601_000))
	if len(evs) != 1 || evs[0].Kind != Fired || evs[0].Alert.Value != -2 || evs[0].Alert.StartedAt != 601_000 {
		t.Fatalf("tick after restart: %v %+v", kinds(evs), evs)
	}
}

// TestSwap: an unchanged rule keeps its state; a changed rule starts over;
// a removed rule's open alert is cleared (nothing else would clear it).
func TestSwap(t *testing.T) {
	hot := mustCompile(t, Rule{Name: "hot", When: "temp > 30", For: Duration(time.Minute)})
	loud := mustCompile(t, Rule{Name: "loud", When: "db > 90"})
	e := newTestEngine(t, hot, loud)
	dev := Device{ID: "d"}
	e.Evaluate(time.UnixMilli(0), dev, map[string]float64{"temp": 31, "db": 95})
	if got := len(e.States()); got != 2 {
		t.Fatalf("%d states", got)
	}
	if evs := e.Swap(time.UnixMilli(1), Set{hot, loud}); len(evs) != 0 {
		t.Fatalf("same set: %v", kinds(evs))
	}
	hot2 := mustCompile(t, Rule{Name: "hot", When: "temp > 31", For: Duration(time.Minute)})
	evs := e.Swap(time.UnixMilli(2), Set{hot2})
	if got := strings.Join(kinds(evs), ","); got != "reset,cleared" {
		t.Fatalf("events %s, want reset (hot changed), cleared (loud removed)", got)
	}
	if len(e.States()) != 0 {
		t.Fatalf("states left: %+v", e.States())
	}
}

// TestCompileSet: one bad rule refuses the whole set; duplicates are
// refused; the set is sorted and versions follow content.
func TestCompileSet(t *testing.T) {
	if _, err := CompileSet([]Rule{{Name: "a", When: "x > 1"}, {Name: "b", When: "x >"}}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a set with a bad rule: %v", err)
	}
	if _, err := CompileSet([]Rule{{Name: "a", When: "x > 1"}, {Name: "a", When: "x > 2"}}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("a duplicate: %v", err)
	}
	s, err := CompileSet([]Rule{{Name: "b", When: "x > 1"}, {Name: "a", When: "x > 1"}})
	if err != nil || s[0].Name != "a" {
		t.Fatalf("%v %v", s, err)
	}
	v := s.Names()
	s2, _ := CompileSet([]Rule{{Name: "a", When: "x > 1"}, {Name: "b", When: "x > 2"}})
	if v["a"] != s2.Names()["a"] || v["b"] == s2.Names()["b"] {
		t.Fatalf("versions %v vs %v", v, s2.Names())
	}
}

// TestAlertMergeConverges: copies of one alert changed at the edge and at
// the cloud (two acks, a clear, an old copy) end equal whatever order they
// are merged in, and a clear is never undone by a later-arriving ack.
func TestAlertMergeConverges(t *testing.T) {
	base := Alert{ID: AlertID("hot", "d", 5), Rule: "hot", Device: "d", Severity: SeverityWarning,
		State: StateActive, Value: 31, StartedAt: 5, Stamp: hlc.New(5, 0)}
	ackEdge := base
	ackEdge.Merge(Alert{AckedAt: 10, AckedBy: "alice", AckStamp: hlc.New(10, 0)})
	ackCloud := base
	ackCloud.Merge(Alert{AckedAt: 11, AckedBy: "bob", AckStamp: hlc.New(11, 0)})
	cleared := base
	cleared.Merge(Alert{ClearedAt: 9, ClearStamp: hlc.New(9, 0)})
	copies := []Alert{base, ackEdge, ackCloud, cleared}
	var want *Alert
	permute(len(copies), func(order []int) {
		a := copies[order[0]]
		for _, i := range order[1:] {
			a.Merge(copies[i])
		}
		if want == nil {
			want = &a
		}
		if a != *want {
			t.Fatalf("order %v: %+v, want %+v", order, a, *want)
		}
	})
	if want.State != StateCleared || want.AckedBy != "bob" || want.ClearedAt != 9 || want.Stamp != hlc.New(11, 0) {
		t.Fatalf("merged %+v: want cleared, acked by bob (the later ack), stamp of the last transition", *want)
	}
	a := cleared
	if a.Merge(cleared) {
		t.Fatal("merging a copy into itself changed it")
	}
}

func permute(n int, f func([]int)) {
	p := make([]int, n)
	for i := range p {
		p[i] = i
	}
	var rec func(k int)
	rec = func(k int) {
		if k == n {
			f(p)
			return
		}
		for i := k; i < n; i++ {
			p[k], p[i] = p[i], p[k]
			rec(k + 1)
			p[k], p[i] = p[i], p[k]
		}
	}
	rec(0)
}

func TestAlertID(t *testing.T) {
	id := AlertID("hot.1", "dev-1", 1234)
	d, r, ms, ok := ParseAlertID(id)
	if !ok || d != "dev-1" || r != "hot.1" || ms != 1234 {
		t.Fatalf("ParseAlertID(%q) = %q %q %d %v", id, d, r, ms, ok)
	}
	for _, bad := range []string{"", "a~b", "a~b~x", "a~b~1~2"} {
		if _, _, _, ok := ParseAlertID(bad); ok {
			t.Errorf("ParseAlertID(%q) ok", bad)
		}
	}
}

// TestRulesByDevice: a rule naming devices runs for exactly those (each
// once, even if named twice), beside rules for every device.
func TestRulesByDevice(t *testing.T) {
	some := mustCompile(t, Rule{Name: "some", When: "temp > 1", Devices: Selector{IDs: []string{"a", "b", "b"}}})
	all := mustCompile(t, Rule{Name: "all", When: "temp > 1"})
	e := newTestEngine(t, some, all)
	for dev, want := range map[string]int{"a": 2, "b": 2, "c": 1} {
		evs, _ := e.Evaluate(time.UnixMilli(1), Device{ID: dev}, map[string]float64{"temp": 2})
		if len(evs) != want {
			t.Errorf("device %s: %v, want %d alerts", dev, kinds(evs), want)
		}
	}
}

// TestRecompileReusesUnchanged: a set recompiled with one rule changed,
// one added and one removed shares the compiled rules that did not change
// (an API put of one rule of a hundred compiles one), compiles the rest,
// and still refuses a bad rule or a duplicate name whole.
func TestRecompileReusesUnchanged(t *testing.T) {
	base := []Rule{
		{Name: "a", When: "temp > 1"},
		{Name: "b", When: "temp > 2", Severity: SeverityWarning},
		{Name: "c", When: "temp > 3", Devices: Selector{IDs: []string{"d1"}}},
	}
	prev, err := CompileSet(base)
	if err != nil {
		t.Fatal(err)
	}
	byName := func(s Set) map[string]*Compiled {
		m := map[string]*Compiled{}
		for _, c := range s {
			m[c.Name] = c
		}
		return m
	}
	next := []Rule{
		{Name: "a", When: "temp > 1", Severity: SeverityWarning}, // the default spelt out: unchanged
		{Name: "b", When: "temp > 20"},                           // changed
		{Name: "d", When: "hum < 5"},                             // added; c removed
	}
	got, err := prev.Recompile(next)
	if err != nil {
		t.Fatal(err)
	}
	want, err := CompileSet(next)
	if err != nil {
		t.Fatal(err)
	}
	p, g := byName(prev), byName(got)
	if len(got) != 3 || g["c"] != nil || g["a"] != p["a"] || g["b"] == p["b"] || g["d"] == nil {
		t.Fatalf("recompiled %v from %v", g, p)
	}
	for i := range want {
		if got[i].Name != want[i].Name || got[i].Version != want[i].Version {
			t.Fatalf("rule %d: %s@%s, compiled afresh %s@%s", i, got[i].Name, got[i].Version, want[i].Name, want[i].Version)
		}
	}
	e := NewEngine(nil, (&clock{}).stamp)
	e.Swap(time.UnixMilli(0), got)
	if evs, _ := e.Evaluate(time.UnixMilli(1), Device{ID: "x"}, map[string]float64{"temp": 10}); len(evs) != 1 || evs[0].Rule.Name != "a" {
		t.Fatalf("temp 10 raised %v, want rule a only (b now needs 20)", evs)
	}
	for _, bad := range [][]Rule{
		{{Name: "a", When: "temp > 1"}, {Name: "b", When: "temp >"}},
		{{Name: "a", When: "temp > 1"}, {Name: "a", When: "temp > 1"}},
	} {
		if _, err := prev.Recompile(bad); !errors.Is(err, ErrInvalid) {
			t.Fatalf("Recompile(%v) = %v, want ErrInvalid", bad, err)
		}
	}
}

// TestEnvFill: the environment an engine reuses from reading to reading
// holds exactly the reading's metrics (a name of an earlier reading is
// gone, a changed value is the new one, -0 stays -0) with metrics and
// device, for a plain and a prepared device alike.
func TestEnvFill(t *testing.T) {
	plain := Device{ID: "d1", Tags: map[string]string{"site": "lab"}}
	e := newEnv()
	for i, tc := range []struct {
		d       Device
		metrics map[string]float64
	}{
		{plain, map[string]float64{"temp": 21, "hum": 40}},
		{plain.Prepared(), map[string]float64{"temp": 22, "hum": 40}},
		{plain, map[string]float64{"temp": 22}},
		{plain.Prepared(), map[string]float64{"temp": math.Copysign(0, -1), "pres": 1013}},
		{plain, map[string]float64{"temp": 0, "pres": 1013}},
	} {
		got := e.fill(tc.d, tc.metrics)
		if len(got) != len(tc.metrics)+2 {
			t.Fatalf("reading %d: env %v, want the %d metrics, metrics and device", i, got, len(tc.metrics))
		}
		for k, v := range tc.metrics {
			if g, ok := got[k].(float64); !ok || math.Float64bits(g) != math.Float64bits(v) {
				t.Errorf("reading %d: %s = %v, want %v", i, k, got[k], v)
			}
		}
		dv, _ := got["device"].(map[string]any)
		if dv["id"] != "d1" || dv["tags"].(map[string]string)["site"] != "lab" {
			t.Errorf("reading %d: device %v", i, dv)
		}
	}
}
