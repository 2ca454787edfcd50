// Package policies carries the default Rego policies inside the binaries, so
// an edge started outside the source tree still authorises requests. The
// .rego files in this directory are the source of truth; operators point the
// daemons at a directory of their own to change them.
package policies

import (
	"embed"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

//go:embed *.rego
var files embed.FS

// Dir returns want if it is a directory; otherwise it writes the built-in
// policies into fallback (keeping files already there, which an operator may
// have edited) and returns fallback.
func Dir(want, fallback string) (string, error) {
	if fi, err := os.Stat(want); err == nil && fi.IsDir() {
		return want, nil
	}
	if err := os.MkdirAll(fallback, 0o755); err != nil {
		return "", fmt.Errorf("create policy dir %s: %w", fallback, err)
	}
	entries, err := fs.ReadDir(files, ".")
	if err != nil {
		return "", fmt.Errorf("read built-in policies: %w", err)
	}
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), "_test.rego") {
			continue
		}
		dst := filepath.Join(fallback, e.Name())
		if _, err := os.Stat(dst); err == nil {
			continue
		}
		b, err := files.ReadFile(e.Name())
		if err != nil {
			return "", fmt.Errorf("read built-in policy %s: %w", e.Name(), err)
		}
		if err := os.WriteFile(dst, b, 0o644); err != nil {
			return "", fmt.Errorf("write policy %s: %w", dst, err)
		}
	}
	return fallback, nil
}

// Builtin returns the built-in policy modules, file name to Rego source
// (tests excluded): what an edge returns to when the cloud distributes no
// policies, and what cloud-sync evaluates while it holds none.
func Builtin() (map[string]string, error) {
	entries, err := fs.ReadDir(files, ".")
	if err != nil {
		return nil, fmt.Errorf("read built-in policies: %w", err)
	}
	out := map[string]string{}
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), "_test.rego") {
			continue
		}
		b, err := files.ReadFile(e.Name())
		if err != nil {
			return nil, fmt.Errorf("read built-in policy %s: %w", e.Name(), err)
		}
		out[e.Name()] = string(b)
	}
	return out, nil
}
