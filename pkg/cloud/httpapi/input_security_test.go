package httpapi

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/outpost-edge/outpost/pkg/wire"
)

func nest(n int) string { return strings.Repeat("[", n) + strings.Repeat("]", n) }

// docChange is a desired change of device d1 whose field f holds value.
func docChange(value string) string {
	return `{"kind":"desired","device":"d1","doc":{"f":{"v":` + value + `,"t":"1732170000123.0"}}}`
}

func pushOf(changes ...string) []byte {
	return []byte(`{"edge":"e1","first_seq":1,"changes":[` + strings.Join(changes, ",") + `]}`)
}

func stateOf(changes ...string) []byte {
	return []byte(`{"edge":"e1","changes":[` + strings.Join(changes, ",") + `]}`)
}

func zstdOf(t testing.TB, b []byte) []byte {
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	return enc.EncodeAll(b, nil)
}

func gzipOf(b []byte) []byte {
	var buf bytes.Buffer
	w := gzip.NewWriter(&buf)
	_, _ = w.Write(b)
	_ = w.Close()
	return buf.Bytes()
}

// JSON the daemons accept and serve back: a sync batch carrying a value
// nested 5000 levels deep, 1e400 or invalid UTF-8 was applied and then
// served in the device list (and pulled by every edge), where clients
// crashed parsing it. Such a push or state batch is now a 400 before the
// service sees it, compressed or not.
func TestSecuritySyncBatchJSONRefused(t *testing.T) {
	bad := []struct{ name, value, want string }{
		{"5000 levels", nest(5000), "nested deeper than 40 levels"},
		{"value deeper than the body depth allows", nest(wire.MaxSyncJSONDepth), "nested deeper than 40 levels"},
		{"1e400", `1e400`, "not a finite float64"},
		{"nested 1e400", `{"a":[1,-1e400]}`, "not a finite float64"},
		{"invalid UTF-8", "\"\xff\xfe\"", "invalid UTF-8"},
		{"invalid UTF-8 key", "{\"\xc3\x28\":1}", "invalid UTF-8"},
		{"unpaired surrogate", `"\udfff"`, "unpaired surrogate"},
	}
	for _, path := range []string{wire.PathPush, wire.PathState} {
		body := pushOf
		if path == wire.PathState {
			body = stateOf
		}
		for _, tc := range bad {
			for _, enc := range []string{"", wire.EncodingZstd, wire.EncodingGzip} {
				t.Run(path+"/"+tc.name+"/"+enc, func(t *testing.T) {
					f := &fakeService{}
					s := newServer(t, f, Config{})
					b := body(docChange(`1`), docChange(tc.value))
					switch enc {
					case wire.EncodingZstd:
						b = zstdOf(t, b)
					case wire.EncodingGzip:
						b = gzipOf(b)
					}
					a := call(t, s, "POST", path, edgeToken, b, "Content-Encoding", enc)
					a.wantError(t, 400, "")
					if !strings.Contains(a.env.Message, tc.want) {
						t.Fatalf("message %q, want %q", a.env.Message, tc.want)
					}
					if calls := f.Calls(); slices.Contains(calls, "Push") || slices.Contains(calls, "State") {
						t.Fatalf("the service saw the batch: %v", calls)
					}
				})
			}
		}
	}
	// A value as deep as an edge's API or broker accepts still syncs.
	f := &fakeService{}
	s := newServer(t, f, Config{})
	for _, path := range []string{wire.PathPush, wire.PathState} {
		b := pushOf(docChange(nest(wire.MaxJSONDepth)))
		if path == wire.PathState {
			b = stateOf(docChange(nest(wire.MaxJSONDepth)))
		}
		if a := call(t, s, "POST", path, edgeToken, b); a.status != 200 {
			t.Fatalf("%s with a value %d deep: %d %s", path, wire.MaxJSONDepth, a.status, a.raw)
		}
	}
}

// The cloud's consumer API applies the same rules to desired state, and
// Cloud policy and value limits: a 5 MB desired value is refused (413),
// plain or compressed.
func TestSecurityCloudDesiredRefused(t *testing.T) {
	f := &fakeService{}
	s := newServer(t, f, Config{})
	for _, tc := range []struct{ name, body, want string }{
		{"5000 levels", `{"state":{"f":` + nest(5000) + `}}`, "nested deeper than 32 levels"},
		{"1e400", `{"state":{"f":1e400}}`, "not a finite float64"},
		{"invalid UTF-8", "{\"state\":{\"f\":\"\xff\"}}", "invalid UTF-8"},
	} {
		a := call(t, s, "PUT", "/api/v1/devices/d1/desired", apiToken, []byte(tc.body))
		a.wantError(t, 400, "")
		if !strings.Contains(a.env.Message, tc.want) {
			t.Errorf("%s: message %q, want %q", tc.name, a.env.Message, tc.want)
		}
	}
	big := []byte(`{"state":{"f":"` + strings.Repeat("x", 5<<20) + `"}}`)
	// Plain, it is refused on its declared length before it is read
	// (pkg/httpguard), which app.Test cannot show: a real listener.
	sv := serveReal(t, f, Config{}, nil)
	if as := exchange(t, sv.addr, fmt.Sprintf("PUT /api/v1/devices/d1/desired HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"+
		"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n", apiToken, len(big))); len(as) == 0 || as[0].status != 413 || as[0].env.Code != 413 {
		t.Fatalf("plain 5 MB desired value: %+v, want one 413", as)
	}
	call(t, s, "PUT", "/api/v1/devices/d1/desired", apiToken, zstdOf(t, big), "Content-Encoding", wire.EncodingZstd).wantError(t, 413, "")
	call(t, s, "PUT", "/api/v1/devices/d1/desired", apiToken, gzipOf(big), "Content-Encoding", wire.EncodingGzip).wantError(t, 413, "")
	if calls := f.Calls(); slices.Contains(calls, "PutDesired") {
		t.Fatalf("the service saw a refused write: %v", calls)
	}
}

// FuzzSyncBatchDecode feeds the cloud's decoding of /sync/v1/push and
// /sync/v1/state bodies — decompression, the JSON rules, strict decoding
// and the batch's validation — with arbitrary bodies. What it accepts must
// follow the JSON rules when encoded again (what the cloud would store and
// serve); nothing may panic.
func FuzzSyncBatchDecode(f *testing.F) {
	// The checked-in corpus in testdata/fuzz/FuzzSyncBatchDecode holds more
	// seeds (compressed ones among them).
	f.Add(uint8(0), uint8(0), pushBody)
	f.Add(uint8(1), uint8(0), stateOf(docChange(`{"mode":"eco"}`)))
	f.Add(uint8(0), uint8(0), pushOf(docChange(`1e400`)))
	f.Add(uint8(1), uint8(1), zstdOf(f, stateOf(docChange(nest(33)))))
	f.Add(uint8(0), uint8(2), gzipOf(pushOf(docChange("\"\xff\""))))
	zdec, err := newZstdDecoder()
	if err != nil {
		f.Fatal(err)
	}
	s := &Server{zdec: zdec}
	f.Fuzz(func(t *testing.T, kind, enc uint8, body []byte) {
		encoding := [...]string{"", wire.EncodingZstd, wire.EncodingGzip}[int(enc)%3]
		var changes []wire.Change
		if kind%2 == 0 {
			var b wire.PushBatch
			if s.decodePushBody(encoding, body, &b) != nil || b.Validate() != nil {
				return
			}
			out, err := wire.AppendPushBatch(nil, &b)
			if err != nil {
				t.Fatalf("push accepted but does not encode: %v", err)
			}
			if err := wire.CheckJSON(out, wire.MaxSyncJSONDepth); err != nil {
				t.Fatalf("push encodes against the rules (%v): %.200s", err, out)
			}
			changes = b.Changes
		} else {
			var b wire.StateBatch
			if s.decodeBatchBody(encoding, body, &b) != nil || b.Validate() != nil {
				return
			}
			changes = b.Changes
		}
		for i, c := range changes {
			for k, v := range c.Doc {
				if !v.Deleted {
					if err := wire.CheckValue(v.Value); err != nil {
						t.Fatalf("change %d field %q accepted against the rules: %v", i, k, err)
					}
				}
			}
			out, err := json.Marshal(c)
			if err != nil {
				t.Fatalf("change %d accepted but does not encode: %v", i, err)
			}
			if err := wire.CheckJSON(out, wire.MaxSyncJSONDepth); err != nil {
				t.Fatalf("change %d encodes against the rules (%v): %s", i, err, fmt.Sprintf("%.200s", out))
			}
		}
	})
}
