package obs

import (
	"fmt"
	"io"
	"log/slog"
)

// NewLogger returns a text logger on w at level (debug, info, warn, error)
// and the LevelVar that changes it at run time (see Admin).
func NewLogger(w io.Writer, level string) (*slog.Logger, *slog.LevelVar, error) {
	lv := new(slog.LevelVar)
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, nil, fmt.Errorf("log level %q: want debug, info, warn or error", level)
	}
	lv.Set(l)
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: lv})), lv, nil
}
