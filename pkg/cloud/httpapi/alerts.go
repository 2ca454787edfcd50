package httpapi

import (
	"context"
	"errors"

	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/utils"

	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/cloud/service"
	"github.com/outpost-edge/outpost/pkg/ident"
	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Alerts is the alerts' side of the service: edges push them, consumers
// list and acknowledge them across edges.
type Alerts interface {
	PushAlerts(ctx context.Context, edge string, b *wire.AlertBatch) (wire.AlertResult, error)
	Alerts(ctx context.Context, q fsm.AlertsQuery) ([]fsm.AlertRecord, error)
	AckAlert(ctx context.Context, id, by string) (fsm.AlertRecord, error)
}

// pushAlerts merges the alerts an edge raised or changed.
func (s *Server) pushAlerts(c *fiber.Ctx) error {
	edge := c.Locals("edge").(string)
	return s.onLeader(c, func(c *fiber.Ctx) error {
		ctx, release, err := s.admit(c)
		if err != nil {
			return err
		}
		defer release()
		var b wire.AlertBatch
		if err := s.decode(c, &b); err != nil {
			return err
		}
		res, err := s.svc.PushAlerts(ctx, edge, &b)
		switch {
		case errors.Is(err, service.ErrWrongEdge):
			return wrongEdge(edge, "push", b.Edge)
		case errors.Is(err, wire.ErrInvalid):
			return apiError(fiber.StatusBadRequest, err.Error())
		case err != nil:
			return err
		}
		return ok(c, res)
	})
}

type alertPage struct {
	Items      []fsm.AlertRecord `json:"items"`
	NextCursor string            `json:"next_cursor"`
}

// listAlerts is GET /api/v1/alerts?state=&device=&edge=&limit=&cursor=:
// alerts across edges in id order, each with the edge that raised it.
func (s *Server) listAlerts(c *fiber.Ctx) error {
	limit, err := limitQuery(c, 100, 1000)
	if err != nil {
		return err
	}
	q := fsm.AlertsQuery{State: c.Query("state"), Device: c.Query("device"), Edge: c.Query("edge"), After: c.Query("cursor"), Limit: limit}
	switch q.State {
	case "", rules.StateActive, rules.StateAcknowledged, rules.StateCleared:
	default:
		return apiError(fiber.StatusBadRequest, "state must be one of: active, acknowledged, cleared")
	}
	if q.Device != "" && !wire.ValidName(q.Device) {
		return apiError(fiber.StatusBadRequest, "device must match [A-Za-z0-9._-]{1,64}")
	}
	if q.Edge != "" && !wire.ValidName(q.Edge) {
		return apiError(fiber.StatusBadRequest, "edge must match [A-Za-z0-9._-]{1,64}")
	}
	if _, _, _, ok := rules.ParseAlertID(q.After); q.After != "" && !ok {
		return apiError(fiber.StatusBadRequest, "cursor: malformed; pass next_cursor from the previous page")
	}
	return s.read(c, func(c *fiber.Ctx) error {
		items, err := s.svc.Alerts(c.UserContext(), q)
		if err != nil {
			return err
		}
		page := alertPage{Items: items}
		if len(items) == limit {
			page.NextCursor = items[len(items)-1].ID
		}
		return ok(c, page)
	})
}

type ackBody struct {
	By string `json:"by"`
}

// ackAlert is POST /api/v1/alerts/{id}/ack with an optional {"by": openid}:
// the ack converges at the edge that raised the alert.
func (s *Server) ackAlert(c *fiber.Ctx) error {
	id := utils.CopyString(c.Params("id"))
	if _, _, _, ok := rules.ParseAlertID(id); !ok {
		return apiError(fiber.StatusBadRequest, "alert id must be device~rule~ms")
	}
	var body ackBody
	if len(c.Body()) > 0 {
		if err := s.decode(c, &body); err != nil {
			return err
		}
	}
	if body.By != "" && !ident.Valid(body.By, 128) {
		return apiError(fiber.StatusBadRequest, "by must be an openid of at most 128 bytes")
	}
	return s.onLeader(c, func(c *fiber.Ctx) error {
		a, err := s.svc.AckAlert(c.UserContext(), id, body.By)
		if errors.Is(err, service.ErrNotFound) {
			return apiError(fiber.StatusNotFound, "alert "+id+" not found")
		}
		if err != nil {
			return err
		}
		return ok(c, a)
	})
}
