package httpapi

import (
	"context"
	"errors"
	"fmt"

	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/utils"

	"github.com/outpost-edge/outpost/pkg/cloud/service"
	"github.com/outpost-edge/outpost/pkg/ident"
	"github.com/outpost-edge/outpost/pkg/rules"
)

// Rules is the distributed rules' side of the service.
type Rules interface {
	Rules(ctx context.Context) ([]service.CloudRule, error)
	PutRule(ctx context.Context, r rules.Rule, region string) (service.CloudRule, error)
	DeleteRule(ctx context.Context, name string) error
}

// ruleRequest is a rule and the region it is limited to.
type ruleRequest struct {
	rules.Rule
	Region string `json:"region"`
}

const badRuleName = "rule name must match [A-Za-z0-9._-]{1,64}"

func (s *Server) listRules(c *fiber.Ctx) error {
	return s.read(c, func(c *fiber.Ctx) error {
		rs, err := s.svc.Rules(c.UserContext())
		if err != nil {
			return err
		}
		return ok(c, fiber.Map{"items": rs})
	})
}

// putRule stores a rule every edge (or every edge of its region) pulls; it
// is compiled first, as the edges will, and refused with the compiler's
// message.
func (s *Server) putRule(c *fiber.Ctx) error {
	name := c.Params("name")
	if !ident.Valid(name, 64) {
		return apiError(fiber.StatusBadRequest, badRuleName)
	}
	var req ruleRequest
	if err := s.decode(c, &req); err != nil {
		return err
	}
	if req.Name != "" && req.Name != name {
		return apiError(fiber.StatusBadRequest, fmt.Sprintf("the body names rule %q, the path %q", req.Name, name))
	}
	req.Rule.Name = utils.CopyString(name)
	return s.onLeader(c, func(c *fiber.Ctx) error {
		r, err := s.svc.PutRule(c.UserContext(), req.Rule, req.Region)
		if err != nil {
			return err
		}
		return ok(c, r)
	})
}

func (s *Server) deleteRule(c *fiber.Ctx) error {
	name := c.Params("name")
	if !ident.Valid(name, 64) {
		return apiError(fiber.StatusBadRequest, badRuleName)
	}
	return s.onLeader(c, func(c *fiber.Ctx) error {
		err := s.svc.DeleteRule(c.UserContext(), name)
		if errors.Is(err, service.ErrNotFound) {
			return apiError(fiber.StatusNotFound, "rule "+name+" not found")
		}
		if err != nil {
			return err
		}
		return ok(c, nil)
	})
}
