// Package config is what the two daemons' configurations share: strict
// YAML loading (an unknown key is an error, not a silent default), problems
// collected with the key each is about, printing the effective
// configuration with its secrets masked (-check-config), and credentials:
// read from files or the environment (so they stay out of argv), and
// refused when they are placeholders or too short outside a development
// configuration (secrets.go). Each daemon owns
// its own Config, defaults and validation (pkg/edge, pkg/cloud); this
// package imports nothing of either, so neither drags in the other's parts.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// ErrInvalid marks a configuration that failed validation; the daemons exit
// 2 on it.
var ErrInvalid = errors.New("invalid configuration")

// Mask replaces a secret in printed configurations.
const Mask = "***"

// Problem is one thing wrong with a configuration, named by its key (the
// YAML path, e.g. "ingest.quota_mb").
type Problem struct {
	Key string
	Msg string
}

func (p Problem) String() string { return p.Key + ": " + p.Msg }

// Errors collects every problem of a configuration, so an operator fixes
// them in one round instead of one per start.
type Errors []Problem

// Add records a problem with key.
func (e *Errors) Add(key, format string, args ...any) {
	*e = append(*e, Problem{Key: key, Msg: fmt.Sprintf(format, args...)})
}

// Err is nil when nothing was recorded, else e as an error matching
// ErrInvalid.
func (e Errors) Err() error {
	if len(e) == 0 {
		return nil
	}
	return e
}

// Error reads "config: http: ... " for one problem and
// "config: 3 errors: http: ...; ingest.quota_mb: ...; ..." for several.
func (e Errors) Error() string {
	parts := make([]string, len(e))
	for i, p := range e {
		parts[i] = p.String()
	}
	if len(e) == 1 {
		return "config: " + parts[0]
	}
	return fmt.Sprintf("config: %d errors: %s", len(e), strings.Join(parts, "; "))
}

// Is makes errors.Is(err, ErrInvalid) true.
func (e Errors) Is(target error) bool { return target == ErrInvalid }

// LoadYAML decodes the file at path into into, over the values already
// there (the defaults). Unknown keys are an error naming the key.
func LoadYAML(path string, into any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read config: %w", err)
	}
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true) // a misspelt key is an error, not a silent default
	if err := dec.Decode(into); err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("config %s: %w", path, err)
	}
	return nil
}

// Print writes v (a configuration whose secrets the caller has masked) as
// YAML, in the shape the config file takes.
func Print(w io.Writer, v any) error {
	enc := yaml.NewEncoder(w)
	enc.SetIndent(2)
	if err := enc.Encode(v); err != nil {
		return fmt.Errorf("print config: %w", err)
	}
	return enc.Close()
}

// MaskString returns Mask for a set secret and "" for an unset one, so the
// printout still tells which secrets are configured.
func MaskString(s string) string {
	if s == "" {
		return ""
	}
	return Mask
}

// MaskValues returns m with every value masked (credentials by name).
func MaskValues(m map[string]string) map[string]string {
	if m == nil {
		return nil
	}
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = MaskString(v)
	}
	return out
}

// CheckHostPort reports what is wrong with a listen or dial address
// ("host:port", host optional, port 0..65535).
func CheckHostPort(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%q is not host:port", addr)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("%q: port %q must be a number 0..65535", addr, port)
	}
	return nil
}

// SplitList splits a comma-separated flag value, dropping empty items.
func SplitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
