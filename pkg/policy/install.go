package policy

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Module is one policy module distributed to the engine from elsewhere (the
// cloud): a file name ending in .rego and its Rego source.
type Module struct {
	Name   string
	Source string
}

// InstalledMarker is the file Install leaves in the policy directory: its
// presence means the modules there were distributed, not copied from the
// local policies, so a restarted edge keeps them rather than re-seeding the
// directory.
const InstalledMarker = ".from-cloud"

// ErrRejected means Install wrote the modules but the engine refused them
// (they do not compile, or lack the decision rules): the last good version
// stays in force. Installing the same set again changes nothing; the next
// distributed set replaces it.
var ErrRejected = errors.New("policy: installed modules rejected")

// Install replaces the modules in the engine's directory with modules and
// reloads at once, rather than at the next poll. Each file is written under a
// temporary name, synced and renamed, so no reader sees a torn file; modules
// no longer in the set are removed afterwards, and InstalledMarker is
// written last. Names are reduced to their base; names that do not end in
// .rego, or start with a dot, are skipped.
//
// The whole installation holds the reload lock, so Run's poll never compiles
// a half-installed set: requests are decided by the old modules until the
// new set took effect as a whole. An error wrapping ErrRejected means the
// files are in place but the policy in force did not change; any other error
// means the directory could not be written and Install may be retried.
func (e *Engine) Install(ctx context.Context, modules []Module) error {
	e.reloadMu.Lock()
	defer e.reloadMu.Unlock()
	if err := installModules(e.cfg.Dir, modules); err != nil {
		return err
	}
	if _, err := e.reloadLocked(ctx); err != nil {
		return fmt.Errorf("%w: %w", ErrRejected, err)
	}
	return nil
}

func installModules(dir string, modules []Module) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("policy: install: %w", err)
	}
	keep := map[string]bool{}
	for _, m := range modules {
		name := filepath.Base(m.Name)
		if !strings.HasSuffix(name, ".rego") || strings.HasPrefix(name, ".") {
			continue
		}
		keep[name] = true
		if err := writeAtomic(filepath.Join(dir, name), []byte(m.Source)); err != nil {
			return err
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("policy: install: %w", err)
	}
	for _, e := range entries {
		if !e.IsDir() && strings.HasSuffix(e.Name(), ".rego") && !keep[e.Name()] {
			if err := os.Remove(filepath.Join(dir, e.Name())); err != nil {
				return fmt.Errorf("policy: install: remove %s: %w", e.Name(), err)
			}
		}
	}
	return writeAtomic(filepath.Join(dir, InstalledMarker), []byte("policies in this directory are managed by cloud sync\n"))
}

// writeAtomic replaces path with data: a synced temporary file renamed over
// it. The temporary name starts with a dot, which scan ignores.
func writeAtomic(path string, data []byte) (err error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".tmp-*")
	if err != nil {
		return fmt.Errorf("policy: install %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			_ = tmp.Close()
			_ = os.Remove(tmp.Name())
			err = fmt.Errorf("policy: install %s: %w", path, err)
		}
	}()
	if _, err := tmp.Write(data); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := tmp.Chmod(0o644); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
