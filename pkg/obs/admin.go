package obs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"strings"
	"time"
)

// Admin is the opt-in admin listener: net/http/pprof under /debug/pprof/
// and the runtime log level at /debug/log-level (GET shows it, PUT with a
// body of debug, info, warn or error changes it). It has no
// authentication: bind it to loopback or an admin network only. Even so,
// /debug/pprof/cmdline shows the program name only, never the arguments:
// credentials may be passed as flags.
type Admin struct {
	ln  net.Listener
	srv *http.Server
	log *slog.Logger
}

// ListenAdmin binds addr; Serve serves it. level may be nil (no log-level
// endpoint).
func ListenAdmin(addr string, level *slog.LevelVar, log *slog.Logger) (*Admin, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("admin listen %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	if level != nil {
		mux.HandleFunc("/debug/log-level", func(w http.ResponseWriter, r *http.Request) {
			switch r.Method {
			case http.MethodGet:
			case http.MethodPut, http.MethodPost:
				b, _ := io.ReadAll(io.LimitReader(r.Body, 64))
				var l slog.Level
				if err := l.UnmarshalText([]byte(strings.TrimSpace(string(b)))); err != nil {
					http.Error(w, "want one of debug, info, warn, error", http.StatusBadRequest)
					return
				}
				level.Set(l)
				log.Info("log level changed", "level", l.String())
			default:
				http.Error(w, "GET or PUT", http.StatusMethodNotAllowed)
				return
			}
			fmt.Fprintln(w, strings.ToLower(level.Level().String()))
		})
	}
	return &Admin{ln: ln, log: log, srv: &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}}, nil
}

// cmdline is pprof.Cmdline with every argument after the program name
// replaced by "<redacted>": a flag's value may be a credential, and which
// arguments are values (a token may start with "-") is not known here.
func cmdline(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	out := make([]string, len(os.Args))
	for i, a := range os.Args {
		if i == 0 {
			out[i] = a
		} else {
			out[i] = "<redacted>"
		}
	}
	fmt.Fprint(w, strings.Join(out, "\x00"))
}

// Addr is the bound address.
func (a *Admin) Addr() string { return a.ln.Addr().String() }

// Run serves until ctx ends, then closes the listener and its connections
// (a profile being taken is cut; nothing else depends on it).
func (a *Admin) Run(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- a.srv.Serve(a.ln) }()
	select {
	case <-ctx.Done():
		_ = a.srv.Close()
		<-errc
		return nil
	case err := <-errc:
		if errors.Is(err, http.ErrServerClosed) {
			return nil
		}
		return fmt.Errorf("admin serve: %w", err)
	}
}
