package raftnode

import (
	"context"
	"io"
	"log"
	"log/slog"
	"sync/atomic"

	"github.com/hashicorp/go-hclog"
)

// slogHCLog is an hclog.Logger that writes to a *slog.Logger, so raft's
// lines are records of the daemon's one log stream (same handler, format
// and output) instead of hclog's own format interleaved with it. hclog
// v1.6 has no slog adapter of its own.
//
// Its level is raft's own (raft_log_level, usually quieter than the
// daemon's); the slog handler's level applies on top. The hclog name
// becomes a "component" attribute; hclog's key/value pairs become attrs.
type slogHCLog struct {
	root  *slog.Logger // the daemon's logger
	log   *slog.Logger // root with the name and the implied args
	name  string
	args  []any
	level *atomic.Int32 // hclog.Level, shared by loggers derived with With/Named
}

func (l *slogHCLog) derive(name string, args []any) *slogHCLog {
	lg := l.root
	if name != "" {
		lg = lg.With("component", name)
	}
	if len(args) > 0 {
		lg = lg.With(args...)
	}
	return &slogHCLog{root: l.root, log: lg, name: name, args: args, level: l.level}
}

// newHCLog returns an hclog.Logger named name that logs to log at level
// (an hclog level name; unknown names mean info).
func newHCLog(log *slog.Logger, name, level string) hclog.Logger {
	lv := hclog.LevelFromString(level)
	if lv == hclog.NoLevel {
		lv = hclog.Info
	}
	l := &slogHCLog{root: log, level: new(atomic.Int32)}
	l.level.Store(int32(lv))
	return l.derive(name, nil)
}

// slogLevel maps hclog's levels onto slog's; trace sits below debug.
func slogLevel(l hclog.Level) slog.Level {
	switch l {
	case hclog.Trace:
		return slog.LevelDebug - 4
	case hclog.Debug:
		return slog.LevelDebug
	case hclog.Warn:
		return slog.LevelWarn
	case hclog.Error:
		return slog.LevelError
	default:
		return slog.LevelInfo
	}
}

func (l *slogHCLog) enabled(lv hclog.Level) bool {
	cur := hclog.Level(l.level.Load())
	return cur != hclog.Off && lv >= cur && l.log.Enabled(context.Background(), slogLevel(lv))
}

func (l *slogHCLog) Log(level hclog.Level, msg string, args ...any) {
	if level == hclog.NoLevel {
		level = hclog.Info
	}
	if !l.enabled(level) {
		return
	}
	l.log.Log(context.Background(), slogLevel(level), msg, args...)
}

func (l *slogHCLog) Trace(msg string, args ...any) { l.Log(hclog.Trace, msg, args...) }
func (l *slogHCLog) Debug(msg string, args ...any) { l.Log(hclog.Debug, msg, args...) }
func (l *slogHCLog) Info(msg string, args ...any)  { l.Log(hclog.Info, msg, args...) }
func (l *slogHCLog) Warn(msg string, args ...any)  { l.Log(hclog.Warn, msg, args...) }
func (l *slogHCLog) Error(msg string, args ...any) { l.Log(hclog.Error, msg, args...) }

func (l *slogHCLog) IsTrace() bool { return l.enabled(hclog.Trace) }
func (l *slogHCLog) IsDebug() bool { return l.enabled(hclog.Debug) }
func (l *slogHCLog) IsInfo() bool  { return l.enabled(hclog.Info) }
func (l *slogHCLog) IsWarn() bool  { return l.enabled(hclog.Warn) }
func (l *slogHCLog) IsError() bool { return l.enabled(hclog.Error) }

func (l *slogHCLog) ImpliedArgs() []any { return l.args }

func (l *slogHCLog) With(args ...any) hclog.Logger {
	return l.derive(l.name, append(append([]any(nil), l.args...), args...))
}

func (l *slogHCLog) Name() string { return l.name }

// Named appends name to the logger's name, as hclog does ("raft.net").
func (l *slogHCLog) Named(name string) hclog.Logger {
	if l.name != "" {
		name = l.name + "." + name
	}
	return l.ResetNamed(name)
}

func (l *slogHCLog) ResetNamed(name string) hclog.Logger {
	return l.derive(name, l.args)
}

func (l *slogHCLog) SetLevel(level hclog.Level) { l.level.Store(int32(level)) }
func (l *slogHCLog) GetLevel() hclog.Level      { return hclog.Level(l.level.Load()) }

func (l *slogHCLog) StandardLogger(opts *hclog.StandardLoggerOptions) *log.Logger {
	lv := slog.LevelInfo
	if opts != nil && opts.ForceLevel != hclog.NoLevel {
		lv = slogLevel(opts.ForceLevel)
	}
	return slog.NewLogLogger(l.log.Handler(), lv)
}

func (l *slogHCLog) StandardWriter(opts *hclog.StandardLoggerOptions) io.Writer {
	return l.StandardLogger(opts).Writer()
}
