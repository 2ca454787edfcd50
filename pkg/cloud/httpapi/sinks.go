package httpapi

import (
	"context"
	"errors"
	"fmt"

	"github.com/gofiber/fiber/v2"

	"github.com/outpost-edge/outpost/pkg/cloud/service"
	"github.com/outpost-edge/outpost/pkg/cloud/sinks"
)

// Sinks is the export sinks as this node sees and manages them;
// *sinks.Manager satisfies it.
type Sinks interface {
	Status() ([]sinks.Status, error)
	Forget(ctx context.Context, name string) error
}

// sinks answers GET /api/v1/sinks: each configured export sink's
// replicated cursor, lag and last error. The leader runs the publishers and
// so knows their errors and positions: the request goes there unless it
// asks for consistency=local (this node's replica: cursor and lag, and
// whatever its own publishers last did).
func (s *Server) sinks(c *fiber.Ctx) error {
	local := func(c *fiber.Ctx) error {
		items := []sinks.Status{}
		if s.cfg.Sinks != nil {
			var err error
			if items, err = s.cfg.Sinks.Status(); err != nil {
				return err
			}
		}
		return ok(c, fiber.Map{"node": s.cfg.NodeID, "items": items})
	}
	switch c.Query("consistency") {
	case "local", "weak":
		return local(c)
	case "", "strong":
		return s.onLeader(c, local)
	}
	return apiError(fiber.StatusBadRequest, "consistency must be strong or local")
}

// forgetSink answers DELETE /api/v1/sinks/{name} on the leader: it drops
// the cursor of a sink no longer configured (it holds log retention back).
func (s *Server) forgetSink(c *fiber.Ctx) error {
	name := c.Params("name")
	return s.onLeader(c, func(c *fiber.Ctx) error {
		if s.cfg.Sinks == nil {
			return apiError(fiber.StatusNotFound, fmt.Sprintf("no cursor of a sink %q", name))
		}
		err := s.cfg.Sinks.Forget(c.UserContext(), name)
		switch {
		case err == nil:
			return ok(c, fiber.Map{"removed": name})
		case errors.Is(err, sinks.ErrNotLeader):
			return service.ErrNotLeader
		case errors.Is(err, sinks.ErrUnknownSink):
			return apiError(fiber.StatusNotFound, fmt.Sprintf("no cursor of a sink %q", name))
		case errors.Is(err, sinks.ErrSinkConfigured):
			return apiError(fiber.StatusConflict, fmt.Sprintf("sink %q is configured: remove it from export.sinks on every node first", name))
		}
		s.log.Warn("forget sink", "sink", name, "err", err)
		return &httpError{status: fiber.StatusServiceUnavailable, retryAfter: 1,
			msg: "the removal may or may not have committed (leadership changed or the proposal timed out); retry"}
	})
}
