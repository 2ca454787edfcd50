package httpapi

import (
	"github.com/gofiber/fiber/v2"

	"github.com/outpost-edge/outpost/pkg/cloud/sinks"
)

// SinkStatus is the export sinks as this node sees them; *sinks.Manager
// satisfies it.
type SinkStatus interface {
	Status() ([]sinks.Status, error)
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
