package config

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/outpost-edge/outpost/pkg/ident"
)

// MinTokenLen is the shortest bearer token a daemon accepts outside
// development: 32 characters (e.g. `openssl rand -hex 32` gives 64) put
// online guessing out of reach even without the auth-failure throttle.
const MinTokenLen = 32

// Placeholder is the marker of the example secrets in the shipped
// configurations and manifests; a credential containing it (any case) is
// refused outside development.
const Placeholder = "change-me"

// IsPlaceholder reports whether s contains Placeholder, in any case.
func IsPlaceholder(s string) bool {
	return strings.Contains(strings.ToLower(s), Placeholder)
}

// Notice is a start-up warning about the configuration: a development
// convenience in force, or a credential file others can read. The daemons
// log each as a WARN line when they start (and -check-config prints them).
type Notice struct {
	Key string
	Msg string
}

func (n Notice) String() string { return n.Key + ": " + n.Msg }

// maxSecretFile bounds what a credential file may hold.
const maxSecretFile = 64 << 10

// ReadSecretFile reads a credential from path: its content without
// trailing newlines (what `echo token > file` leaves). An empty file is an
// error. A file every user may read yields a Notice, not an error:
// container runtimes mount secrets 0644 by default inside a container only
// the daemon runs in, and refusing them would break those without making
// them safer.
func ReadSecretFile(key, path string) (string, []Notice, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", nil, err
	}
	if fi.IsDir() {
		return "", nil, fmt.Errorf("%s is a directory, not a file", path)
	}
	b, err := io.ReadAll(io.LimitReader(f, maxSecretFile+1))
	if err != nil {
		return "", nil, err
	}
	if len(b) > maxSecretFile {
		return "", nil, fmt.Errorf("%s is larger than %d KiB", path, maxSecretFile>>10)
	}
	s := strings.TrimRight(string(b), "\r\n")
	if s == "" {
		return "", nil, fmt.Errorf("%s is empty", path)
	}
	var notes []Notice
	if fi.Mode().Perm()&0o004 != 0 {
		notes = append(notes, Notice{Key: key, Msg: fmt.Sprintf("%s is readable by every user (mode %04o): chmod 600 it", path, fi.Mode().Perm())})
	}
	return s, notes, nil
}

// Credential is one secret of a configuration and the places it may come
// from. Resolve picks one, highest first: a flag (the value or its -…-file
// form), then the environment variable, then the config file (the value or
// its …_file key). Giving both forms at the same level is a mistake, not a
// precedence question.
type Credential struct {
	Key       string  // YAML key of the value, e.g. "api_token"
	FlagName  string  // e.g. "api-token"; its file form is FlagName+"-file"
	Env       string  // environment variable, e.g. "OUTPOST_API_TOKEN"; "" for none
	Value     *string // the value: the config file's, or the flag's if FlagValue
	File      *string // the file path: the config file's, or the flag's if FlagFile
	FlagValue bool    // Value came from a flag
	FlagFile  bool    // File came from a flag
}

// Resolve fills *c.Value from the highest source, reading a file if that is
// what it names, and records problems in errs under c.Key (or c.Key+"_file")
// and warnings in notes. getenv is os.Getenv outside tests.
func (c Credential) Resolve(getenv func(string) string, errs *Errors, notes *[]Notice) {
	fileKey := c.Key + "_file"
	switch {
	case c.FlagValue && c.FlagFile:
		errs.Add(c.Key, "-%s and -%s-file are mutually exclusive", c.FlagName, c.FlagName)
		return
	case c.FlagValue:
		*c.File = ""
		return
	case c.FlagFile:
	case c.Env != "" && getenv(c.Env) != "":
		*c.Value, *c.File = getenv(c.Env), ""
		return
	case *c.Value != "" && *c.File != "":
		errs.Add(c.Key, "set %s or %s, not both", c.Key, fileKey)
		return
	}
	if *c.File == "" {
		return
	}
	v, n, err := ReadSecretFile(fileKey, *c.File)
	if err != nil {
		errs.Add(fileKey, "%v", err)
		return
	}
	*c.Value = v
	*notes = append(*notes, n...)
}

// ParseTokenMap reads EDGE=TOKEN pairs, one a line (commas separate too;
// blank lines and lines starting with # are skipped), or, if any line is not
// of that form, a YAML map of edge: token.
func ParseTokenMap(text string) (map[string]string, error) {
	out := map[string]string{}
	pairs := true
	for _, line := range strings.FieldsFunc(text, func(r rune) bool { return r == '\n' || r == ',' }) {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		name, tok, ok := strings.Cut(line, "=")
		name = strings.TrimSpace(name)
		if !ok || !ident.DeviceID(name) || strings.TrimSpace(tok) == "" {
			pairs = false
			break
		}
		if _, dup := out[name]; dup {
			return nil, fmt.Errorf("edge %q is listed twice", name)
		}
		out[name] = strings.TrimSpace(tok)
	}
	if pairs {
		return out, nil
	}
	out = map[string]string{}
	if err := yaml.Unmarshal([]byte(text), &out); err != nil {
		return nil, fmt.Errorf("want EDGE=TOKEN lines or a YAML map of edge: token: %w", err)
	}
	for name, tok := range out {
		if tok == "" {
			return nil, fmt.Errorf("edge %q has an empty token", name)
		}
	}
	return out, nil
}

// ReadTokenMap reads edge tokens from path: a file as ParseTokenMap reads
// it, or a directory holding one file per edge, named by the edge id (a
// mounted Kubernetes Secret; names starting with "." are skipped, which
// covers the volume's ..data links).
func ReadTokenMap(key, path string) (map[string]string, []Notice, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, nil, err
	}
	if !fi.IsDir() {
		text, notes, err := ReadSecretFile(key, path)
		if err != nil {
			return nil, nil, err
		}
		m, err := ParseTokenMap(text)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", path, err)
		}
		return m, notes, nil
	}
	entries, err := os.ReadDir(path)
	if err != nil {
		return nil, nil, err
	}
	names := make([]string, 0, len(entries))
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), ".") {
			names = append(names, e.Name())
		}
	}
	sort.Strings(names)
	out := map[string]string{}
	var notes []Notice
	for _, name := range names {
		p := filepath.Join(path, name)
		if st, err := os.Stat(p); err != nil || st.IsDir() {
			if err != nil && !errors.Is(err, fs.ErrNotExist) {
				return nil, nil, err
			}
			continue
		}
		tok, n, err := ReadSecretFile(key, p)
		if err != nil {
			return nil, nil, err
		}
		out[name] = tok
		notes = append(notes, n...)
	}
	if len(out) == 0 {
		return nil, nil, fmt.Errorf("%s holds no token files", path)
	}
	return out, notes, nil
}

// CheckToken records in errs what is wrong with a bearer token outside
// development (a placeholder, or under MinTokenLen), or, in development,
// the same as notes. An empty token is the caller's business.
func CheckToken(key, tok string, development bool, errs *Errors, notes *[]Notice) {
	if tok == "" {
		return
	}
	CheckSecret(key, tok, development, errs, notes)
	if len(tok) < MinTokenLen && !IsPlaceholder(tok) {
		if development {
			*notes = append(*notes, Notice{Key: key, Msg: fmt.Sprintf("the token has %d characters (outside development it needs %d or more)", len(tok), MinTokenLen)})
			return
		}
		errs.Add(key, "the token has %d characters, fewer than the %d required (generate one with: openssl rand -hex 32)", len(tok), MinTokenLen)
	}
}

// CheckSecret refuses a placeholder secret outside development, and notes
// it in development.
func CheckSecret(key, secret string, development bool, errs *Errors, notes *[]Notice) {
	if !IsPlaceholder(secret) {
		return
	}
	if development {
		*notes = append(*notes, Notice{Key: key, Msg: "a placeholder secret (" + Placeholder + ") is in use"})
		return
	}
	errs.Add(key, "holds the placeholder %q: set a real secret (generate one with: openssl rand -hex 32), or mark a development configuration with development: true", Placeholder)
}
