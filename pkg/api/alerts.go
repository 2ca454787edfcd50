package api

import (
	"context"
	"errors"
	"fmt"

	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/utils"

	"github.com/outpost-edge/outpost/pkg/alerting"
	"github.com/outpost-edge/outpost/pkg/ident"
	"github.com/outpost-edge/outpost/pkg/policy"
	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Policy actions on rules and alerts.
const (
	actRuleWrite = "rule.write"
	actAlertRead = "alert.read"
	actAlertAck  = "alert.ack"
)

// Rules is the edge's rule runner (pkg/alerting). Nil: the rule and alert
// endpoints answer 503.
type Rules interface {
	List(ctx context.Context) ([]alerting.RuleInfo, error)
	PutLocal(ctx context.Context, r rules.Rule) (alerting.RuleInfo, error)
	DeleteLocal(ctx context.Context, name string) error
	Ack(ctx context.Context, id, by string) (rules.Alert, error)
}

// Alerts reads the stored alerts.
type Alerts interface {
	Alerts(q store.AlertsQuery) ([]rules.Alert, error)
}

var ruleResource = policy.Resource{Kind: "rule", Owners: []string{}, Tags: map[string]string{}}

func (s *Server) rulesRunning(c *fiber.Ctx) bool {
	if s.deps.Rules == nil || s.deps.Alerts == nil {
		_ = fail(c, fiber.StatusServiceUnavailable, "rules are not running on this edge")
		return false
	}
	return true
}

func (s *Server) listRules(c *fiber.Ctx) error {
	if !s.rulesRunning(c) {
		return nil
	}
	if err := s.authorize(c, actRuleWrite, ruleResource); err != nil {
		return deny(c, err)
	}
	list, err := s.deps.Rules.List(c.UserContext())
	if err != nil {
		return err
	}
	if list == nil {
		list = []alerting.RuleInfo{}
	}
	return ok(c, fiber.Map{"items": list})
}

func (s *Server) putRule(c *fiber.Ctx) error {
	if !s.rulesRunning(c) {
		return nil
	}
	name, err := s.ruleAccess(c)
	if name == "" {
		return err
	}
	var r rules.Rule
	if err := decodeBody(c, &r); err != nil {
		return fail(c, fiber.StatusBadRequest, err.Error())
	}
	if r.Name != "" && r.Name != name {
		return fail(c, fiber.StatusBadRequest, fmt.Sprintf("the body names rule %q, the path %q", truncate(r.Name), name))
	}
	r.Name = utils.CopyString(name)
	info, err := s.deps.Rules.PutLocal(c.UserContext(), r)
	switch {
	case errors.Is(err, wire.ErrInvalid):
		return fail(c, fiber.StatusBadRequest, err.Error())
	case errors.Is(err, alerting.ErrConflict):
		return fail(c, fiber.StatusConflict, err.Error())
	case err != nil:
		return err
	}
	return ok(c, info)
}

// ruleAccess is the path's rule name once it is valid and the caller may
// write rules; "" with the answer already given otherwise.
func (s *Server) ruleAccess(c *fiber.Ctx) (string, error) {
	name := c.Params("name")
	if !ident.Valid(name, 64) {
		return "", fail(c, fiber.StatusBadRequest, "rule name must match [A-Za-z0-9._-]{1,64}")
	}
	res := ruleResource
	res.ID = name
	if err := s.authorize(c, actRuleWrite, res); err != nil {
		return "", deny(c, err)
	}
	return name, nil
}

func (s *Server) deleteRule(c *fiber.Ctx) error {
	if !s.rulesRunning(c) {
		return nil
	}
	name, err := s.ruleAccess(c)
	if name == "" {
		return err
	}
	switch err := s.deps.Rules.DeleteLocal(c.UserContext(), name); {
	case errors.Is(err, alerting.ErrNotFound):
		return fail(c, fiber.StatusNotFound, "no edge-local rule "+name+" (cloud rules are changed at the cloud)")
	case err != nil:
		return err
	}
	return ok(c, nil)
}

type alertPage struct {
	Items      []rules.Alert `json:"items"`
	NextCursor string        `json:"next_cursor"`
}

var alertStates = map[string]bool{"": true, rules.StateActive: true, rules.StateAcknowledged: true, rules.StateCleared: true}

func (s *Server) listAlerts(c *fiber.Ctx) error {
	if !s.rulesRunning(c) {
		return nil
	}
	limit, err := wire.ParseLimit(c.Query("limit"), 100, s.cfg.MaxPage)
	if err != nil {
		return fail(c, fiber.StatusBadRequest, err.Error())
	}
	q := store.AlertsQuery{State: c.Query("state"), Device: c.Query("device"), After: c.Query("cursor")}
	if !alertStates[q.State] {
		return fail(c, fiber.StatusBadRequest, fmt.Sprintf("state: %q is not one of: active, acknowledged, cleared", truncate(q.State)))
	}
	if q.Device != "" && !ident.DeviceID(q.Device) {
		return fail(c, fiber.StatusBadRequest, badDeviceID)
	}
	if q.After != "" {
		if _, _, _, ok := rules.ParseAlertID(q.After); !ok {
			return fail(c, fiber.StatusBadRequest, "cursor: malformed; pass next_cursor from the previous page")
		}
	}
	// Policy filters alert by alert, on its device; bound the scan as the
	// device list does.
	page := alertPage{Items: []rules.Alert{}}
	allowed := map[string]bool{}
	budget := 10*limit + 1000
	for scanned := 0; scanned < budget && len(page.Items) < limit; {
		q.Limit = min(limit, budget-scanned)
		batch, err := s.deps.Alerts.Alerts(q)
		if err != nil {
			return err
		}
		consumed := 0
		for _, a := range batch {
			consumed++
			scanned++
			q.After = a.ID
			may, seen := allowed[a.Device]
			if !seen {
				if may, err = s.mayReadAlerts(c, a.Device); err != nil {
					return err
				}
				allowed[a.Device] = may
			}
			if may {
				page.Items = append(page.Items, a)
				if len(page.Items) == limit {
					break
				}
			}
		}
		if consumed == len(batch) && len(batch) < q.Limit {
			q.After = "" // the end
			break
		}
	}
	page.NextCursor = q.After
	return ok(c, page)
}

// deviceResource is what the policy is asked about device id: its record,
// or unknownDevice when there is none (so that a missing device is no
// oracle, as in device).
func (s *Server) deviceResource(id string) (policy.Resource, error) {
	d, err := s.deps.Store.Device(id)
	switch {
	case errors.Is(err, store.ErrNotFound):
		return unknownDevice(id), nil
	case err != nil:
		return policy.Resource{}, err
	}
	return resourceOf(d), nil
}

// mayReadAlerts decides alert.read on a device; a denial is false, not an
// error.
func (s *Server) mayReadAlerts(c *fiber.Ctx, id string) (bool, error) {
	res, err := s.deviceResource(id)
	if err != nil {
		return false, err
	}
	err = s.authorize(c, actAlertRead, res)
	var denied errDenied
	if errors.As(err, &denied) {
		return false, nil
	}
	return err == nil, err
}

func (s *Server) ackAlert(c *fiber.Ctx) error {
	if !s.rulesRunning(c) {
		return nil
	}
	id := c.Params("id")
	device, _, _, valid := rules.ParseAlertID(id)
	if !valid || !ident.DeviceID(device) {
		return fail(c, fiber.StatusBadRequest, "alert id must be device~rule~started_ms as the alert lists it")
	}
	res, err := s.deviceResource(device)
	if err != nil {
		return err
	}
	if err := s.authorize(c, actAlertAck, res); err != nil {
		return deny(c, err)
	}
	a, err := s.deps.Rules.Ack(c.UserContext(), utils.CopyString(id), userOf(c).OpenID)
	switch {
	case errors.Is(err, alerting.ErrNotFound):
		return fail(c, fiber.StatusNotFound, "alert "+id+" not found")
	case err != nil:
		return err
	}
	return ok(c, a)
}
