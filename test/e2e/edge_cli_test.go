package e2e

import (
	"errors"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestEdgeCommandLine: -h documents the contract's flags and exits 0; a bad
// configuration exits 2 and a busy port exits 1, each with a message that
// says what is wrong.
func TestEdgeCommandLine(t *testing.T) {
	bin := edgeBinary(t)
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	dir := t.TempDir()
	free := func() string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return l.Addr().String()
	}
	cases := []struct {
		name string
		args []string
		code int
		msg  string
	}{
		{"help", []string{"-h"}, 0, "-mqtt-broker"},
		{"unknown flag", []string{"-nope"}, 2, "flag provided but not defined"},
		{"missing config file", []string{"-config", filepath.Join(dir, "none.yaml")}, 2, "read config"},
		{"bad location", []string{"-id", "e1", "-location", "north"}, 2, "LAT,LNG"},
		{"cloud without token", []string{"-id", "e1", "-cloud", "http://127.0.0.1:1"}, 2, "cloud token"},
		{"busy http port", []string{"-id", "e1", "-data", filepath.Join(dir, "a"), "-http", busy.Addr().String(), "-mqtt-listen", free()}, 1, "address already in use"},
		{"busy mqtt port", []string{"-id", "e1", "-data", filepath.Join(dir, "b"), "-http", free(), "-mqtt-listen", busy.Addr().String()}, 1, "mqtt listen"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out, err := exec.Command(bin, tc.args...).CombinedOutput()
			code := 0
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				code = ee.ExitCode()
			}
			if code != tc.code || !strings.Contains(string(out), tc.msg) {
				t.Fatalf("exit %d, output:\n%s\nwant exit %d mentioning %q", code, out, tc.code, tc.msg)
			}
		})
	}
	out, _ := exec.Command(bin, "-h").CombinedOutput()
	for _, flag := range []string{"-config", "-id", "-data", "-http", "-mqtt-listen", "-mqtt-broker", "-cloud", "-cloud-token", "-region", "-location", "-advertise", "-admin", "-dev-login"} {
		if !strings.Contains(string(out), "  "+flag+" ") && !strings.Contains(string(out), "  "+flag+"\n") {
			t.Errorf("-h does not document %s:\n%s", flag, out)
		}
	}
}
