package config

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestIsPlaceholder(t *testing.T) {
	for s, want := range map[string]bool{
		"dev-api-token-change-me": true, "CHANGE-ME-edge-east-token": true, "Change-Me": true,
		"changeme": false, "8c1f0a6e2b9d4c7f8a1e3b5d7c9f0a2e": false, "": false,
	} {
		if got := IsPlaceholder(s); got != want {
			t.Errorf("IsPlaceholder(%q) = %v, want %v", s, got, want)
		}
	}
}

func TestParseTokenMap(t *testing.T) {
	tests := []struct {
		name, text string
		want       map[string]string
		err        string
	}{
		{"lines", "# tokens\ne1=aaa\n\ne2 = bbb=\n", map[string]string{"e1": "aaa", "e2": "bbb="}, ""},
		{"commas", "e1=aaa,e2=bbb", map[string]string{"e1": "aaa", "e2": "bbb"}, ""},
		{"yaml", "e1: aaa\ne2: 'b=b'\n", map[string]string{"e1": "aaa", "e2": "b=b"}, ""},
		{"duplicate", "e1=a\ne1=b\n", nil, "listed twice"},
		{"empty yaml value", "e1: ''\n", nil, "empty token"},
		{"neither", "e1 aaa\n", nil, "want EDGE=TOKEN lines or a YAML map"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseTokenMap(tt.text)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("err = %v, want %q", err, tt.err)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("got %v, %v; want %v", got, err, tt.want)
			}
		})
	}
}

func TestReadSecretFile(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil {
			t.Fatal(err)
		}
		return p
	}
	v, notes, err := ReadSecretFile("k", write("a", "tok en\r\n\n", 0o600))
	if err != nil || v != "tok en" || len(notes) != 0 {
		t.Fatalf("got %q %v %v, want the content without trailing newlines", v, notes, err)
	}
	if _, notes, err := ReadSecretFile("k", write("b", "tok\n", 0o644)); err != nil || len(notes) != 1 || notes[0].Key != "k" {
		t.Fatalf("world-readable: notes %v err %v, want one notice under k", notes, err)
	}
	if _, _, err := ReadSecretFile("k", write("c", "\n", 0o600)); err == nil || !strings.Contains(err.Error(), "empty") {
		t.Fatalf("empty file: %v", err)
	}
	if _, _, err := ReadSecretFile("k", write("d", strings.Repeat("x", maxSecretFile+1), 0o600)); err == nil {
		t.Fatal("an oversized file was read")
	}
	if _, _, err := ReadSecretFile("k", dir); err == nil {
		t.Fatal("a directory was read as a token")
	}
}
