package main

import (
	"bytes"
	"path/filepath"
	"strings"
	"testing"

	"github.com/outpost-edge/outpost/pkg/certs"
)

// TestCertsSubcommand: `cloud-sync certs` writes a CA and one loadable
// cluster credential per node, prints the flags to use, and is a usage
// error (exit 2) without -dir or -nodes.
func TestCertsSubcommand(t *testing.T) {
	dir := t.TempDir()
	var out, errOut bytes.Buffer
	if code := runCerts([]string{"-dir", dir, "-nodes", "n1,n2"}, &out, &errOut); code != 0 {
		t.Fatalf("exit %d: %s", code, errOut.String())
	}
	for _, n := range []string{"n1", "n2"} {
		if _, err := certs.LoadCluster(filepath.Join(dir, "ca.pem"), filepath.Join(dir, n+".pem"), filepath.Join(dir, n+"-key.pem")); err != nil {
			t.Fatalf("%s: %v", n, err)
		}
		if !strings.Contains(out.String(), n+": -cluster-ca ") {
			t.Fatalf("no flags printed for %s:\n%s", n, out.String())
		}
	}
	if code := runCerts([]string{"-dir", dir}, &out, &errOut); code != 2 {
		t.Fatalf("without -nodes: exit %d, want 2", code)
	}
}
