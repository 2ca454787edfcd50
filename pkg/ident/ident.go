// Package ident validates the identifiers that cross Outpost's boundaries:
// device ids, metric names, regions and tag keys share one charset that is
// safe in MQTT topics, URL paths and bbolt keys; openids are a wider printable
// set. Keeping the rule in one place keeps the MQTT decoder, the HTTP API and
// the configuration in agreement.
package ident

import "strings"

// Valid reports whether s matches [A-Za-z0-9._-]{1,max} and is not "." or
// "..", which would be path segments.
func Valid(s string, max int) bool {
	if len(s) == 0 || len(s) > max || s == "." || s == ".." {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// DeviceID reports whether id is a valid device id: [A-Za-z0-9._-]{1,64}.
func DeviceID(id string) bool { return Valid(id, 64) }

// OpenID accepts WeChat openids and dev-login names: 1 to 128 printable ASCII
// characters without '/', '\\', '%' or "..".
func OpenID(s string) bool {
	if len(s) == 0 || len(s) > 128 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= 0x20 || c >= 0x7f || c == '/' || c == '\\' || c == '%' {
			return false
		}
	}
	return !strings.Contains(s, "..")
}
