// Package policy decides authorisation requests with Open Policy Agent. An
// Engine compiles the Rego modules in a directory into one prepared query for
// data.outpost.authz, reloads them when the files change (keeping the last
// good version if a change does not compile), and caches decisions. Install
// replaces the directory's modules with a distributed set (an edge receives
// the cloud's through sync) and reloads at once.
package policy

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	lru "github.com/hashicorp/golang-lru/v2"
	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/prometheus/client_golang/prometheus"
)

// Input is what the policy sees; its JSON form is the policy's input document.
type Input struct {
	User     User     `json:"user"`
	Action   string   `json:"action"`
	Resource Resource `json:"resource"`
}

// User is the authenticated caller.
type User struct {
	OpenID  string   `json:"openid"`
	Roles   []string `json:"roles"`
	Regions []string `json:"regions"`
}

// Resource is the object acted on.
type Resource struct {
	Kind   string            `json:"kind"`
	ID     string            `json:"id"`
	Owners []string          `json:"owners"`
	Region string            `json:"region"`
	Tags   map[string]string `json:"tags"`
}

// Decision is the policy's answer. Reason is meant for the client: on a
// denial it says what the caller lacks.
type Decision struct {
	Allow  bool   `json:"allow"`
	Reason string `json:"reason"`
}

// Defaults for Config.
const (
	DefaultPollInterval = time.Second
	DefaultCacheSize    = 10000
)

// Query is the document the policy must define: allow (bool) and reason.
const (
	packagePath = "data.outpost.authz"
	query       = "allow = data.outpost.authz.allow; reason = data.outpost.authz.reason"
)

// ErrNoPolicy is returned when the policy directory holds no usable module.
var ErrNoPolicy = errors.New("policy: no policy modules found")

// Config configures an Engine.
type Config struct {
	Dir          string        // directory of *.rego files (recursively; *_test.rego excluded)
	PollInterval time.Duration // how often Run checks for changes; default DefaultPollInterval
	// CacheSize bounds the decision cache in entries; default
	// DefaultCacheSize, negative disables caching.
	CacheSize  int
	Registerer prometheus.Registerer // metrics; nil means not exported
	Logger     *slog.Logger          // default slog.Default()
	// Bypass makes Decide allow everything without evaluating. It exists
	// only to measure the API's cost without policy in benchmarks; never
	// enable it in a deployment.
	Bypass bool
	// OnChange, if set, is called after a new policy version took effect
	// (a reload or an Install, not the first load), on the reloading
	// goroutine and under the reload lock: it must not block, nor reload
	// or install itself. The edge uses it to re-check phones' live
	// subscriptions at once instead of at their next periodic check.
	OnChange func()
}

// compiled is one policy version with its own decision cache, so swapping
// the pointer invalidates cached decisions atomically with the policy.
type compiled struct {
	pq      rego.PreparedEvalQuery
	version string                                  // hash of the module sources
	cache   *lru.Cache[[sha256.Size]byte, Decision] // nil when caching is off
}

// Engine evaluates authorisation decisions. It is safe for concurrent use.
type Engine struct {
	cfg Config
	log *slog.Logger
	m   *metrics
	cur atomic.Pointer[compiled]

	// reloadMu serialises reloads; the fields below belong to it.
	reloadMu    sync.Mutex
	fingerprint string // of the files' names, sizes and mtimes at the last look
	failed      string // version that last failed to compile, so it is reported once
}

// New loads and compiles the policies in cfg.Dir. It fails if they do not
// compile: with no last good version there is nothing safe to fall back to.
func New(ctx context.Context, cfg Config) (*Engine, error) {
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = DefaultPollInterval
	}
	if cfg.CacheSize == 0 {
		cfg.CacheSize = DefaultCacheSize
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	e := &Engine{cfg: cfg, log: cfg.Logger, m: m}
	if cfg.Bypass {
		e.log.Warn("policy: bypass enabled; every request is allowed (benchmarks only)")
	}
	if _, err := e.Reload(ctx); err != nil {
		return nil, err
	}
	return e, nil
}

// Version identifies the policy in force (a hash of its sources).
func (e *Engine) Version() string {
	if c := e.cur.Load(); c != nil {
		return c.version
	}
	return ""
}

// Decide evaluates in against the current policy. An error means no
// decision could be made; callers must treat it as a denial.
func (e *Engine) Decide(ctx context.Context, in Input) (Decision, error) {
	if e.cfg.Bypass {
		return Decision{Allow: true, Reason: "policy bypassed"}, nil
	}
	c := e.cur.Load()
	var key [sha256.Size]byte
	if c.cache != nil {
		key = cacheKey(in)
		if d, ok := c.cache.Get(key); ok {
			e.m.cacheHits.Inc()
			e.m.observe(in, d)
			return d, nil
		}
		e.m.cacheMisses.Inc()
	}
	start := time.Now()
	rs, err := c.pq.Eval(ctx, rego.EvalParsedInput(in.astValue()))
	e.m.evalDuration.Observe(time.Since(start).Seconds())
	if err != nil {
		e.m.decisions.WithLabelValues("error").Inc()
		return Decision{}, fmt.Errorf("policy: evaluate %s on %s %q: %w", in.Action, in.Resource.Kind, in.Resource.ID, err)
	}
	d := Decision{Reason: "policy made no decision"}
	if len(rs) == 1 {
		allow, _ := rs[0].Bindings["allow"].(bool)
		reason, _ := rs[0].Bindings["reason"].(string)
		d = Decision{Allow: allow, Reason: reason}
	}
	// Stored in the cache captured above: if the policy or data changed
	// meanwhile, that cache is no longer reachable and the entry dies with it.
	if c.cache != nil {
		c.cache.Add(key, d)
	}
	e.m.observe(in, d)
	return d, nil
}

// InvalidateData drops cached decisions. Call it when something the inputs
// are built from (roles, regions, ownership) changed and stale decisions
// must not be served, or if the policy reads data outside its input.
func (e *Engine) InvalidateData() {
	for {
		old := e.cur.Load()
		next := *old
		next.cache = newCache(e.cfg.CacheSize)
		if e.cur.CompareAndSwap(old, &next) {
			return
		}
	}
}

// Run checks the policy directory every PollInterval and reloads on change,
// until ctx is done.
func (e *Engine) Run(ctx context.Context) error {
	t := time.NewTicker(e.cfg.PollInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			// Errors are logged and counted by Reload; the last good policy stays.
			_, _ = e.Reload(ctx)
		}
	}
}

// Reload compiles the policy directory if it changed since the last look and
// swaps it in. It reports whether a new version took effect. On failure the
// previous version stays in force.
func (e *Engine) Reload(ctx context.Context) (changed bool, err error) {
	e.reloadMu.Lock()
	defer e.reloadMu.Unlock()
	return e.reloadLocked(ctx)
}

// reloadLocked is Reload with reloadMu held.
func (e *Engine) reloadLocked(ctx context.Context) (changed bool, err error) {
	files, fp, err := scan(e.cfg.Dir)
	if err != nil {
		err = fmt.Errorf("policy: scan %s: %w", e.cfg.Dir, err)
		// Report a persistent problem (say, the files were deleted) once,
		// not on every poll.
		if key := "error\x00" + err.Error(); key != e.fingerprint {
			e.fingerprint = key
			e.failed = ""
			e.m.reloadFailures.Inc()
			e.logFailure(err)
		}
		return false, err
	}
	if fp == e.fingerprint && e.cur.Load() != nil {
		return false, nil
	}
	sources, version, err := readSources(files)
	if err != nil {
		return false, e.reloadFailed("", fmt.Errorf("policy: read %s: %w", e.cfg.Dir, err))
	}
	e.fingerprint = fp
	if cur := e.cur.Load(); cur != nil && cur.version == version {
		return false, nil // touched, not changed
	}
	if version == e.failed {
		return false, nil // already reported
	}
	c, err := compile(ctx, sources)
	if err != nil {
		return false, e.reloadFailed(version, fmt.Errorf("policy: compile %s: %w", e.cfg.Dir, err))
	}
	c.version = version
	c.cache = newCache(e.cfg.CacheSize)
	prev := e.cur.Swap(c)
	e.failed = ""
	e.m.reloads.Inc()
	if prev == nil {
		e.log.Info("policy loaded", "dir", e.cfg.Dir, "version", short(version), "files", len(files))
		return true, nil
	}
	e.log.Info("policy reloaded", "dir", e.cfg.Dir, "version", short(version), "previous", short(prev.version), "files", len(files))
	if e.cfg.OnChange != nil {
		e.cfg.OnChange()
	}
	return true, nil
}

func (e *Engine) reloadFailed(version string, err error) error {
	e.failed = version
	e.m.reloadFailures.Inc()
	e.logFailure(err)
	return err
}

func (e *Engine) logFailure(err error) {
	if cur := e.cur.Load(); cur != nil {
		e.log.Error("policy reload failed; keeping last good policy", "err", err, "version", short(cur.version))
	}
}

func short(v string) string { return v[:min(12, len(v))] }

func newCache(size int) *lru.Cache[[sha256.Size]byte, Decision] {
	if size < 0 {
		return nil
	}
	c, err := lru.New[[sha256.Size]byte, Decision](size)
	if err != nil {
		panic(err) // only for size <= 0, excluded above
	}
	return c
}

// scan lists the policy modules under dir and fingerprints their names,
// sizes and modification times, so an unchanged directory costs only stats.
func scan(dir string) (files []string, fingerprint string, err error) {
	var b strings.Builder
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		name := d.Name()
		if d.IsDir() {
			if path != dir && strings.HasPrefix(name, ".") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(name, ".rego") || strings.HasSuffix(name, "_test.rego") || strings.HasPrefix(name, ".") {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		files = append(files, path)
		fmt.Fprintf(&b, "%s\x00%d\x00%d\n", path, fi.Size(), fi.ModTime().UnixNano())
		return nil
	})
	if err != nil {
		return nil, "", err
	}
	if len(files) == 0 {
		return nil, "", ErrNoPolicy
	}
	return files, b.String(), nil
}

func readSources(files []string) (map[string]string, string, error) {
	h := sha256.New()
	sources := make(map[string]string, len(files))
	for _, f := range files { // sorted by WalkDir, so the hash is stable
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, "", err
		}
		sources[f] = string(b)
		fmt.Fprintf(h, "%s\x00%d\x00", f, len(b))
		h.Write(b)
	}
	return sources, hex.EncodeToString(h.Sum(nil)), nil
}

func compile(ctx context.Context, sources map[string]string) (*compiled, error) {
	compiler, err := compileModules(sources)
	if err != nil {
		return nil, err
	}
	// A module set that compiles but lacks the decision rules would deny
	// everything; treat it as broken rather than swap it in.
	for _, rule := range []string{"allow", "reason"} {
		if len(compiler.GetRulesExact(ast.MustParseRef(packagePath+"."+rule))) == 0 {
			return nil, fmt.Errorf("no rule %s.%s defined", packagePath, rule)
		}
	}
	pq, err := prepare(ctx, compiler)
	if err != nil {
		return nil, err
	}
	return &compiled{pq: pq}, nil
}

func compileModules(sources map[string]string) (*ast.Compiler, error) {
	return ast.CompileModulesWithOpt(sources, ast.CompileOpts{
		ParserOptions: ast.ParserOptions{RegoVersion: ast.RegoV1},
	})
}

func prepare(ctx context.Context, compiler *ast.Compiler) (rego.PreparedEvalQuery, error) {
	return rego.New(rego.Query(query), rego.Compiler(compiler)).PrepareForEval(ctx)
}

// ErrCompile marks a module set Check refuses; the error's text is the
// compiler's message, naming file and line.
var ErrCompile = errors.New("policy: modules do not compile")

// Check compiles modules the way an engine given exactly that set would
// (parse, compile, prepare the decision query), without evaluating
// anything or touching a directory: what the cloud runs before it accepts
// a module for distribution, so a module no edge could load is refused at
// the source instead of blocking every later policy update at every edge.
// It does not require the decision rules: a set is often assembled one
// module at a time, and the engine refuses (and reports) a set without
// them while the last good policy stays in force. Names are file names, as
// in Install; test modules (*_test.rego) are skipped like scan skips them.
func Check(ctx context.Context, modules []Module) error {
	sources := make(map[string]string, len(modules))
	for _, m := range modules {
		name := filepath.Base(m.Name)
		if !strings.HasSuffix(name, ".rego") || strings.HasSuffix(name, "_test.rego") || strings.HasPrefix(name, ".") {
			continue
		}
		sources[name] = m.Source
	}
	if len(sources) == 0 {
		return nil
	}
	compiler, err := compileModules(sources)
	if err == nil {
		_, err = prepare(ctx, compiler)
	}
	if err != nil {
		return fmt.Errorf("%w: %w", ErrCompile, err)
	}
	return nil
}

// astValue converts in without a JSON round trip; nil slices and maps
// become empty collections so the policy never sees null.
func (in Input) astValue() ast.Value {
	strs := func(ss []string) *ast.Term {
		ts := make([]*ast.Term, len(ss))
		for i, s := range ss {
			ts[i] = ast.StringTerm(s)
		}
		return ast.ArrayTerm(ts...)
	}
	tags := make([][2]*ast.Term, 0, len(in.Resource.Tags))
	for k, v := range in.Resource.Tags {
		tags = append(tags, ast.Item(ast.StringTerm(k), ast.StringTerm(v)))
	}
	return ast.NewObject(
		ast.Item(ast.StringTerm("user"), ast.ObjectTerm(
			ast.Item(ast.StringTerm("openid"), ast.StringTerm(in.User.OpenID)),
			ast.Item(ast.StringTerm("roles"), strs(in.User.Roles)),
			ast.Item(ast.StringTerm("regions"), strs(in.User.Regions)),
		)),
		ast.Item(ast.StringTerm("action"), ast.StringTerm(in.Action)),
		ast.Item(ast.StringTerm("resource"), ast.ObjectTerm(
			ast.Item(ast.StringTerm("kind"), ast.StringTerm(in.Resource.Kind)),
			ast.Item(ast.StringTerm("id"), ast.StringTerm(in.Resource.ID)),
			ast.Item(ast.StringTerm("owners"), strs(in.Resource.Owners)),
			ast.Item(ast.StringTerm("region"), ast.StringTerm(in.Resource.Region)),
			ast.Item(ast.StringTerm("tags"), ast.ObjectTerm(tags...)),
		)),
	)
}

// cacheKey hashes a canonical encoding of everything the policy receives:
// length-prefixed strings, lists in their given order (a policy may read
// them positionally), tags sorted by key. The whole input is keyed, not a
// subset, because a reloaded policy may start reading any field.
func cacheKey(in Input) [sha256.Size]byte {
	h := sha256.New()
	str := func(s string) {
		writeLen(h, len(s))
		h.Write([]byte(s))
	}
	list := func(ss []string) {
		writeLen(h, len(ss))
		for _, s := range ss {
			str(s)
		}
	}
	str(in.User.OpenID)
	list(in.User.Roles)
	list(in.User.Regions)
	str(in.Action)
	str(in.Resource.Kind)
	str(in.Resource.ID)
	list(in.Resource.Owners)
	str(in.Resource.Region)
	keys := make([]string, 0, len(in.Resource.Tags))
	for k := range in.Resource.Tags {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	writeLen(h, len(keys))
	for _, k := range keys {
		str(k)
		str(in.Resource.Tags[k])
	}
	var out [sha256.Size]byte
	h.Sum(out[:0])
	return out
}

func writeLen(h hash.Hash, n int) {
	var b [binary.MaxVarintLen64]byte
	h.Write(b[:binary.PutUvarint(b[:], uint64(n))])
}
