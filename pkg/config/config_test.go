package config

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestErrors(t *testing.T) {
	var none Errors
	if none.Err() != nil {
		t.Fatal("no problems must be a nil error")
	}
	var one Errors
	one.Add("http", "%q is not host:port", "x")
	if got := one.Err().Error(); got != `config: http: "x" is not host:port` {
		t.Fatalf("one problem: %q", got)
	}
	var three Errors
	three.Add("http", "bad")
	three.Add("ingest.quota_mb", "must be ≥ 0")
	three.Add("log_level", "loud")
	err := fmt.Errorf("wrapped: %w", three.Err())
	if got, want := three.Error(), "config: 3 errors: http: bad; ingest.quota_mb: must be ≥ 0; log_level: loud"; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
	var back Errors
	if !errors.Is(err, ErrInvalid) || !errors.As(err, &back) || len(back) != 3 || back[1].Key != "ingest.quota_mb" {
		t.Fatalf("callers cannot branch on %v", err)
	}
}

func TestCheckHostPort(t *testing.T) {
	for addr, ok := range map[string]bool{
		":8080": true, "127.0.0.1:0": true, "[::1]:1883": true, "host:65535": true,
		":x": false, "8080": false, "": false, "h:65536": false, "h:-1": false,
	} {
		if err := CheckHostPort(addr); (err == nil) != ok {
			t.Errorf("CheckHostPort(%q) = %v, want ok=%v", addr, err, ok)
		}
	}
}

func TestLoadYAMLUnknownKey(t *testing.T) {
	p := filepath.Join(t.TempDir(), "c.yaml")
	if err := os.WriteFile(p, []byte("name: a\nnmae: b\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var v struct {
		Name string `yaml:"name"`
	}
	if err := LoadYAML(p, &v); err == nil || !strings.Contains(err.Error(), "nmae") {
		t.Fatalf("LoadYAML with an unknown key = %v, want an error naming it", err)
	}
}

func TestMask(t *testing.T) {
	if MaskString("") != "" || MaskString("s") != Mask {
		t.Fatal("MaskString must keep unset secrets visible as unset and hide set ones")
	}
	m := MaskValues(map[string]string{"e1": "tok"})
	if m["e1"] != Mask {
		t.Fatalf("MaskValues = %v", m)
	}
}
