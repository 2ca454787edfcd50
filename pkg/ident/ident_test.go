package ident

import (
	"strings"
	"testing"
)

func TestValid(t *testing.T) {
	tests := []struct {
		in   string
		want bool
	}{
		{"dev-1", true}, {"a.b_c-D9", true}, {strings.Repeat("a", 64), true},
		{"", false}, {strings.Repeat("a", 65), false}, {".", false}, {"..", false},
		{"a/b", false}, {"a b", false}, {"é", false}, {"a\x00", false}, {"a+b", false}, {"#", false},
	}
	for _, tt := range tests {
		if got := DeviceID(tt.in); got != tt.want {
			t.Errorf("DeviceID(%q) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func TestOpenID(t *testing.T) {
	tests := []struct {
		in   string
		want bool
	}{
		{"oAbC-123_xyz", true}, {"admin", true}, {strings.Repeat("o", 128), true},
		{"", false}, {strings.Repeat("o", 129), false}, {"a/b", false}, {`a\b`, false},
		{"a%2e", false}, {"a..b", false}, {"a b", false}, {"a\x7f", false}, {"a\n", false},
	}
	for _, tt := range tests {
		if got := OpenID(tt.in); got != tt.want {
			t.Errorf("OpenID(%q) = %v, want %v", tt.in, got, tt.want)
		}
	}
}
