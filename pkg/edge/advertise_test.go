package edge

import (
	"strings"
	"testing"
)

// Edge directory: the advertise URL was not validated, so javascript: was
// served to phones. The edge's configuration now refuses anything but an
// absolute http(s) URL with a host and without userinfo, under its key.
func TestSecurityAdvertiseConfig(t *testing.T) {
	for _, bad := range []string{"javascript:alert(1)", "data:text/html,x", "edge.local:8080", "https://admin:pw@edge.local", "/api"} {
		c := DefaultConfig()
		c.Advertise = bad
		err := c.Validate()
		if err == nil || !strings.Contains(err.Error(), "advertise") {
			t.Errorf("advertise %q: %v, want an error under advertise", bad, err)
		}
	}
	for _, ok := range []string{"", "http://127.0.0.1:8080", "https://edge-7.example.com/outpost"} {
		c := DefaultConfig()
		c.Advertise = ok
		if err := c.Validate(); err != nil {
			t.Errorf("advertise %q: %v", ok, err)
		}
	}
}
