package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"testing"
	"time"
)

// TestEdgeHTTPMiniProgram: the edge binary as a mini-program meets it. A
// device connected to the embedded broker is online, on the device and in
// the list; the list with include=latest carries its newest reading; a read
// answers its ETag with 304 and a big page is gzipped; disconnecting turns
// the device offline; the OpenAPI document is served without a token.
func TestEdgeHTTPMiniProgram(t *testing.T) {
	e := startEdge(t)
	tok := e.login()
	dev := "http-e2e"
	c := edgeConnect(t, e.MQTT, dev)
	now := time.Now().UnixMilli()
	for i := range 40 {
		p := fmt.Appendf(nil, `{"ts":%d,"id":"m%d","metrics":{"temp":%d.5,"hum":%d}}`, now-int64(40-i)*1000, i, 20+i, 40+i)
		if tk := c.Publish("sensors/"+dev+"/telemetry", 1, false, p); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
			t.Fatalf("publish %d: %v", i, tk.Error())
		}
	}
	type device struct {
		ID     string           `json:"id"`
		Online bool             `json:"online"`
		Latest *json.RawMessage `json:"latest"`
	}
	online := func() bool {
		var d device
		if err := e.api(http.MethodGet, "/api/v1/devices/"+dev, tok, nil, &d); err != nil {
			t.Fatal(err)
		}
		return d.Online
	}
	cloudWaitFor(t, 10*time.Second, "the connected device is online", online)
	var page struct {
		Items []device `json:"items"`
	}
	if err := e.api(http.MethodGet, "/api/v1/devices?include=latest", tok, nil, &page); err != nil {
		t.Fatal(err)
	}
	if len(page.Items) != 1 || !page.Items[0].Online || page.Items[0].Latest == nil {
		t.Fatalf("list with latest: %+v", page.Items)
	}
	var latest struct {
		TS int64 `json:"ts"`
	}
	if err := json.Unmarshal(*page.Items[0].Latest, &latest); err != nil || latest.TS != now-1000 {
		t.Fatalf("latest %s: %v", *page.Items[0].Latest, err)
	}

	get := func(path string, h map[string]string) *http.Response {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, "http://"+e.HTTP+path, nil)
		req.Header.Set("Authorization", "Bearer "+tok)
		for k, v := range h {
			req.Header.Set(k, v)
		}
		resp, err := (&http.Transport{DisableCompression: true}).RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp
	}
	closed := fmt.Sprintf("/api/v1/devices/%s/readings?from=%d&to=%d", dev, now-60_000, now-1)
	first := get(closed, map[string]string{"Accept-Encoding": "gzip"})
	if first.StatusCode != 200 || first.Header.Get("ETag") == "" || first.Header.Get("Content-Encoding") != "gzip" {
		t.Fatalf("closed range: %d, ETag %q, Content-Encoding %q", first.StatusCode, first.Header.Get("ETag"), first.Header.Get("Content-Encoding"))
	}
	if again := get(closed, map[string]string{"If-None-Match": first.Header.Get("ETag")}); again.StatusCode != http.StatusNotModified {
		t.Fatalf("If-None-Match: %d, want 304", again.StatusCode)
	}

	c.Disconnect(50)
	cloudWaitFor(t, 10*time.Second, "the disconnected device is offline", func() bool { return !online() })

	req, _ := http.NewRequest(http.MethodGet, "http://"+e.HTTP+"/api/v1/openapi.json", nil)
	resp, err := edgeHTTP.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var doc struct {
		OpenAPI string `json:"openapi"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil || resp.StatusCode != 200 || doc.OpenAPI == "" {
		t.Fatalf("openapi.json: %d %v %q", resp.StatusCode, err, doc.OpenAPI)
	}
}
