package httpapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"

	"github.com/gofiber/fiber/v2"

	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/cloud/raftnode"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/httpenv"
	"github.com/outpost-edge/outpost/pkg/ident"
	"github.com/outpost-edge/outpost/pkg/shadow"
	"github.com/outpost-edge/outpost/pkg/wire"
)

const hdrNextCursor = "X-Outpost-Next-Cursor"

// --- health and cluster ---------------------------------------------------

func (s *Server) ready(c *fiber.Ctx) error {
	if _, _, ok := s.node.Leader(); !ok {
		return &httpError{status: fiber.StatusServiceUnavailable, msg: "no raft leader known yet", retryAfter: 1}
	}
	return ok(c, fiber.Map{"status": "ready", "applied_index": s.fsm.AppliedIndex()})
}

func (s *Server) status(c *fiber.Ctx) error {
	return s.read(c, func(c *fiber.Ctx) error {
		st, err := s.node.Status()
		if err != nil {
			return err
		}
		return ok(c, st)
	})
}

// JoinRequest is the body of POST /cluster/v1/join.
type JoinRequest struct {
	ID       string `json:"id"`
	RaftAddr string `json:"raft_addr"`
	HTTPAddr string `json:"http_addr"`
}

func (s *Server) join(c *fiber.Ctx) error {
	var req JoinRequest
	if err := s.decode(c, &req); err != nil {
		return err
	}
	switch {
	case !wire.ValidName(req.ID):
		return apiError(fiber.StatusBadRequest, "id must match [A-Za-z0-9._-]{1,64}")
	case !validHostPort(req.RaftAddr):
		return apiError(fiber.StatusBadRequest, fmt.Sprintf("raft_addr %q must be host:port", req.RaftAddr))
	case !validHostPort(req.HTTPAddr):
		return apiError(fiber.StatusBadRequest, fmt.Sprintf("http_addr %q must be host:port", req.HTTPAddr))
	}
	return s.onLeader(c, func(c *fiber.Ctx) error {
		ctx, cancel := context.WithTimeout(c.UserContext(), s.cfg.RequestTimeout)
		defer cancel()
		err := s.node.Join(ctx, req.ID, req.RaftAddr, req.HTTPAddr)
		switch {
		case errors.Is(err, raftnode.ErrConflict):
			return apiError(fiber.StatusConflict, err.Error())
		case err != nil:
			return proposeErr(err)
		}
		return ok(c, req)
	})
}

func (s *Server) remove(c *fiber.Ctx) error {
	id := c.Params("id")
	if !wire.ValidName(id) {
		return apiError(fiber.StatusBadRequest, "node id must match [A-Za-z0-9._-]{1,64}")
	}
	return s.onLeader(c, func(c *fiber.Ctx) error {
		ctx, cancel := context.WithTimeout(c.UserContext(), s.cfg.RequestTimeout)
		defer cancel()
		err := s.node.Remove(ctx, id)
		switch {
		case errors.Is(err, raftnode.ErrNoSuchNode):
			return apiError(fiber.StatusNotFound, fmt.Sprintf("node %q is not a cluster member", id))
		case err != nil:
			return proposeErr(err)
		}
		return ok(c, fiber.Map{"removed": id})
	})
}

func (s *Server) snapshot(c *fiber.Ctx) error {
	if err := s.node.Snapshot(); err != nil {
		return err
	}
	return ok(c, fiber.Map{"applied_index": s.fsm.AppliedIndex()})
}

// --- sync API -------------------------------------------------------------

func (s *Server) push(c *fiber.Ctx) error {
	edge := c.Locals("edge").(string)
	return s.onLeader(c, func(c *fiber.Ctx) error {
		if s.node.Overloaded() {
			s.m.throttled.Inc()
			return proposeErr(raftnode.ErrOverloaded)
		}
		var b wire.PushBatch
		if err := s.decode(c, &b); err != nil {
			return err
		}
		if err := b.Validate(); err != nil {
			return invalid(err)
		}
		if b.Edge != edge {
			return apiError(fiber.StatusForbidden, fmt.Sprintf("this token belongs to edge %q; it may not push as %q", edge, b.Edge))
		}
		// A re-sent batch that is already committed needs no raft entry.
		acked := s.fsm.EdgeSeq(edge)
		if b.LastSeq() <= acked {
			s.m.pushes.WithLabelValues(edge, "duplicate").Inc()
			return ok(c, wire.PushResult{AckedSeq: acked})
		}
		rejected, err := s.checkStamps(edge, b.Changes)
		if err != nil {
			return err
		}
		// An edge may pipeline pushes: let this one queue only after its
		// predecessor has (bounded wait), so they apply in sequence order
		// instead of the later one bouncing off a gap.
		s.gate.wait(c.UserContext(), edge, b.FirstSeq, acked)
		ctx, cancel := context.WithTimeout(c.UserContext(), s.cfg.RequestTimeout)
		defer cancel()
		res, err := s.node.ProposeOrdered(ctx, &fsm.Command{Type: fsm.CmdPush, AtMs: s.now().UnixMilli(), Push: &b},
			func() { s.gate.queued(edge, b.LastSeq()) })
		if err != nil {
			return proposeErr(err)
		}
		if errors.Is(res.Err, fsm.ErrSeqGap) {
			s.m.pushes.WithLabelValues(edge, "gap").Inc()
			return &httpError{status: fiber.StatusConflict,
				msg:     fmt.Sprintf("sequence gap: the cloud expects sequence %d next from edge %q, batch starts at %d", res.Expected, edge, b.FirstSeq),
				headers: map[string]string{wire.HeaderExpectedSeq: strconv.FormatUint(res.Expected, 10)}}
		}
		if res.Err != nil {
			return res.Err
		}
		s.m.pushes.WithLabelValues(edge, "ok").Inc()
		return ok(c, wire.PushResult{AckedSeq: res.AckedSeq, Applied: res.Applied, Duplicates: res.Duplicates, Index: res.Index,
			RejectedStamps: rejected})
	})
}

// checkStamps drops state fields (and meta and user records) whose HLC stamp
// is further ahead of this node's clock than the maximum drift, counting
// each, and folds the accepted stamps into the leader's clock so cloud-side
// writes are stamped after them. It never refuses the batch: a refusal would
// stall the edge's whole stream (its readings too) behind one bad clock.
// Changes left empty stay in place as no-ops so sequence numbers still line
// up.
func (s *Server) checkStamps(edge string, changes []wire.Change) (int, error) {
	rejected := 0
	for i := range changes {
		c := &changes[i]
		for name, f := range c.Doc {
			if _, err := s.clock.Update(f.Stamp); err != nil {
				if !errors.Is(err, hlc.ErrDrift) {
					return 0, err
				}
				delete(c.Doc, name)
				rejected++
			}
		}
		var stamp *hlc.Timestamp
		switch {
		case c.Kind == wire.KindMeta && c.Meta != nil:
			stamp = &c.Meta.Stamp
		case c.Kind == wire.KindUser && c.User != nil:
			stamp = &c.User.Stamp
		}
		if stamp != nil && !stamp.IsZero() {
			if _, err := s.clock.Update(*stamp); err != nil {
				if !errors.Is(err, hlc.ErrDrift) {
					return 0, err
				}
				// Keep the record but make it lose to everything: an
				// older stamp than any real write.
				*stamp = 1
				rejected++
			}
		}
	}
	if rejected > 0 {
		s.m.stamps.WithLabelValues(edge).Add(float64(rejected))
		s.log.Warn("rejected HLC stamps beyond the maximum clock drift; fix the edge's clock", "edge", edge, "fields", rejected)
	}
	return rejected, nil
}

// state applies an edge's state changes ahead of its sequenced stream.
func (s *Server) state(c *fiber.Ctx) error {
	edge := c.Locals("edge").(string)
	return s.onLeader(c, func(c *fiber.Ctx) error {
		if s.node.Overloaded() {
			s.m.throttled.Inc()
			return proposeErr(raftnode.ErrOverloaded)
		}
		var b wire.StateBatch
		if err := s.decode(c, &b); err != nil {
			return err
		}
		if b.Edge == "" {
			b.Edge = edge
		}
		if err := b.Validate(); err != nil {
			return invalid(err)
		}
		if b.Edge != edge {
			return apiError(fiber.StatusForbidden, fmt.Sprintf("this token belongs to edge %q; it may not push as %q", edge, b.Edge))
		}
		rejected, err := s.checkStamps(edge, b.Changes)
		if err != nil {
			return err
		}
		if len(b.Changes) == 0 {
			return ok(c, wire.StateResult{})
		}
		res, err := s.propose(c, &fsm.Command{Type: fsm.CmdState, AtMs: s.now().UnixMilli(), State: &b})
		if err != nil {
			return err
		}
		if res.Err != nil {
			return res.Err
		}
		return ok(c, wire.StateResult{Applied: res.Applied, RejectedStamps: rejected})
	})
}

func (s *Server) pull(c *fiber.Ctx) error {
	edge := c.Locals("edge").(string)
	limit, err := limitQuery(c, 500, 5000)
	if err != nil {
		return err
	}
	return s.read(c, func(c *fiber.Ctx) error {
		page, err := s.fsm.Pull(edge, c.Query("cursor"), limit)
		if errors.Is(err, fsm.ErrBadCursor) {
			return apiError(fiber.StatusBadRequest, "cursor is not one this API issued; start from an empty cursor")
		}
		if err != nil {
			return err
		}
		// The whole current sets ride along: they are small, and an edge
		// that missed any number of changes gets the latest in one page.
		if page.Policies, err = s.fsm.Policies(); err != nil {
			return err
		}
		if page.Edges, err = s.directory(); err != nil {
			return err
		}
		if jwks, err := s.jwks(); err == nil {
			page.Keys = jwks
		} else if !errors.Is(err, fsm.ErrNotFound) {
			return err
		}
		page.ServerTimeMs = s.now().UnixMilli()
		return ok(c, page)
	})
}

func (s *Server) heartbeat(c *fiber.Ctx) error {
	edge := c.Locals("edge").(string)
	return s.onLeader(c, func(c *fiber.Ctx) error {
		var h wire.Heartbeat
		if err := s.decode(c, &h); err != nil {
			return err
		}
		if h.Edge == "" {
			h.Edge = edge
		}
		if err := h.Validate(); err != nil {
			return invalid(err)
		}
		if h.Edge != edge {
			return apiError(fiber.StatusForbidden, fmt.Sprintf("this token belongs to edge %q; it may not heartbeat as %q", edge, h.Edge))
		}
		// Make sure the deployment has a signing key before edges pull:
		// then every edge trusts it before the first phone logs in.
		if err := s.ensureSigningKey(c.UserContext()); err != nil {
			return err
		}
		now := s.now()
		res, err := s.propose(c, &fsm.Command{Type: fsm.CmdHeartbeat, AtMs: now.UnixMilli(), Heartbeat: &h})
		if err != nil {
			return err
		}
		s.m.backlog.WithLabelValues(edge).Set(float64(h.Backlog))
		return ok(c, wire.HeartbeatResult{AckedSeq: res.AckedSeq, ServerTimeMs: now.UnixMilli()})
	})
}

// --- consumer API ---------------------------------------------------------

// DeviceView is a device as the consumer API shows it: plain state objects
// plus their versions (the greatest HLC stamp in each).
type DeviceView struct {
	ID              string                     `json:"id"`
	EdgeID          string                     `json:"edge_id"`
	FirstSeen       int64                      `json:"first_seen"`
	LastSeen        int64                      `json:"last_seen"`
	Region          string                     `json:"region"`
	Tags            map[string]string          `json:"tags"`
	Owners          []string                   `json:"owners"`
	Reported        map[string]json.RawMessage `json:"reported"`
	Desired         map[string]json.RawMessage `json:"desired"`
	ReportedVersion hlc.Timestamp              `json:"reported_version"`
	DesiredVersion  hlc.Timestamp              `json:"desired_version"`
}

func view(d *fsm.Device) DeviceView {
	nz := func(s []string) []string {
		if s == nil {
			return []string{}
		}
		return s
	}
	return DeviceView{ID: d.ID, EdgeID: d.EdgeID, FirstSeen: d.FirstSeen, LastSeen: d.LastSeen, Region: d.Region,
		Tags: tagMap(d.Tags), Owners: nz(d.Owners), Reported: d.Reported.State(), Desired: d.Desired.State(),
		ReportedVersion: d.Reported.Version(), DesiredVersion: d.Desired.Version()}
}

func deviceParam(c *fiber.Ctx) (string, error) {
	id := c.Params("id")
	if !wire.ValidName(id) {
		return "", apiError(fiber.StatusBadRequest, "device id must match [A-Za-z0-9._-]{1,64}")
	}
	return id, nil
}

func (s *Server) getDevice(c *fiber.Ctx) error {
	id, err := deviceParam(c)
	if err != nil {
		return err
	}
	return s.read(c, func(c *fiber.Ctx) error {
		d, err := s.fsm.GetDevice(id)
		if errors.Is(err, fsm.ErrNotFound) {
			return apiError(fiber.StatusNotFound, fmt.Sprintf("device %q not found", id))
		}
		if err != nil {
			return err
		}
		return ok(c, view(d))
	})
}

func (s *Server) readings(c *fiber.Ctx) error {
	id, err := deviceParam(c)
	if err != nil {
		return err
	}
	limit, err := limitQuery(c, 100, 1000)
	if err != nil {
		return err
	}
	from, err := timeQuery(c, "from")
	if err != nil {
		return err
	}
	to, err := timeQuery(c, "to")
	if err != nil {
		return err
	}
	cursor, err := wire.ParseCursor(c.Query("cursor"))
	if err != nil {
		return ruleErr(err)
	}
	return s.read(c, func(c *fiber.Ctx) error {
		items, next, err := s.fsm.Readings(fsm.ReadingsQuery{Device: id, FromMs: from, ToMs: to,
			Metric: c.Query("metric"), Limit: limit, Cursor: cursor})
		if errors.Is(err, fsm.ErrBadCursor) {
			return apiError(fiber.StatusBadRequest, "cursor does not belong to this device's readings; start without one")
		}
		if err != nil {
			return err
		}
		if items == nil {
			items = []fsm.StoredReading{}
		}
		return ok(c, fiber.Map{"items": items, "next_cursor": next})
	})
}

type desiredBody struct {
	State map[string]json.RawMessage `json:"state"`
}

func (s *Server) putDesired(c *fiber.Ctx) error {
	id, err := deviceParam(c)
	if err != nil {
		return err
	}
	if err := consumerBody(c); err != nil {
		return err
	}
	var body desiredBody
	if err := s.decode(c, &body); err != nil {
		return err
	}
	if err := wire.ValidateState(body.State); err != nil {
		return ruleErr(err)
	}
	return s.onLeader(c, func(c *fiber.Ctx) error {
		// Stamped here, on the leader, so Apply stays deterministic.
		doc := shadow.Patch(body.State, s.clock.Now())
		return s.proposeDevice(c, &fsm.Command{Type: fsm.CmdDesired, AtMs: s.now().UnixMilli(),
			Change: &wire.Change{Kind: wire.KindDesired, Device: id, Doc: doc}})
	})
}

// metaBody is the consumer API's meta write, shaped like the edge's.
type metaBody struct {
	Owners []string          `json:"owners"`
	Region string            `json:"region"`
	Tags   map[string]string `json:"tags"`
}

func (s *Server) putMeta(c *fiber.Ctx) error {
	id, err := deviceParam(c)
	if err != nil {
		return err
	}
	if err := consumerBody(c); err != nil {
		return err
	}
	var body metaBody
	if err := s.decode(c, &body); err != nil {
		return err
	}
	m := wire.Meta{Owners: body.Owners, Region: body.Region, Tags: body.Tags}
	if err := m.Validate(); err != nil {
		return ruleErr(err)
	}
	m.Normalize()
	return s.onLeader(c, func(c *fiber.Ctx) error {
		m.Stamp = s.clock.Now()
		return s.proposeDevice(c, &fsm.Command{Type: fsm.CmdMeta, AtMs: s.now().UnixMilli(),
			Change: &wire.Change{Kind: wire.KindMeta, Device: id, Meta: &m}})
	})
}

func (s *Server) proposeDevice(c *fiber.Ctx, cmd *fsm.Command) error {
	res, err := s.propose(c, cmd)
	if err != nil {
		return err
	}
	if res.Err != nil || res.Device == nil {
		return fmt.Errorf("device write: %v", res.Err)
	}
	return ok(c, view(res.Device))
}

func (s *Server) directory() ([]wire.Edge, error) {
	edges, err := s.fsm.Edges()
	if err != nil {
		return nil, err
	}
	wire.MarkHealth(edges, s.now().UnixMilli(), s.cfg.HeartbeatFresh)
	if edges == nil {
		edges = []wire.Edge{}
	}
	return edges, nil
}

func (s *Server) edges(c *fiber.Ctx) error {
	return s.read(c, func(c *fiber.Ctx) error {
		edges, err := s.directory()
		if err != nil {
			return err
		}
		return ok(c, fiber.Map{"items": edges})
	})
}

func (s *Server) nearest(c *fiber.Ctx) error {
	here, err := wire.ParseLocation(c.Query("lat"), c.Query("lng"))
	if err != nil {
		return ruleErr(err)
	}
	limit, err := limitQuery(c, 5, 100)
	if err != nil {
		return err
	}
	return s.read(c, func(c *fiber.Ctx) error {
		all, err := s.directory()
		if err != nil {
			return err
		}
		return ok(c, fiber.Map{"items": wire.Nearest(all, here, "", limit)})
	})
}

var errExportFull = errors.New("export page full")

func (s *Server) export(c *fiber.Ctx) error {
	limit, err := limitQuery(c, 1000, 10000)
	if err != nil {
		return err
	}
	since := c.Query("since")
	if _, _, err := fsm.ParseExportCursor(since); err != nil {
		return apiError(fiber.StatusBadRequest, fmt.Sprintf("since %q is not an export cursor (INDEX or INDEX.N from a previous export)", since))
	}
	return s.read(c, func(c *fiber.Ctx) error {
		var buf bytes.Buffer
		enc := json.NewEncoder(&buf)
		next, err := s.fsm.Export(since, limit, func(r *fsm.ExportRecord) error {
			if buf.Len() > 16<<20 {
				return errExportFull // bound the page's memory; the cursor resumes
			}
			return enc.Encode(r)
		})
		if err != nil && !errors.Is(err, errExportFull) {
			return err
		}
		c.Set(fiber.HeaderContentType, "application/x-ndjson")
		c.Set(hdrNextCursor, next)
		return c.Status(fiber.StatusOK).Send(buf.Bytes())
	})
}

func (s *Server) getUser(c *fiber.Ctx) error {
	openid := c.Params("openid")
	return s.read(c, func(c *fiber.Ctx) error {
		u, err := s.fsm.GetUser(openid)
		if errors.Is(err, fsm.ErrNotFound) {
			return apiError(fiber.StatusNotFound, fmt.Sprintf("user %q not found", openid))
		}
		if err != nil {
			return err
		}
		return ok(c, u)
	})
}

func (s *Server) putUser(c *fiber.Ctx) error {
	openid := c.Params("openid")
	if !ident.OpenID(openid) {
		return apiError(fiber.StatusBadRequest, badOpenID)
	}
	var u wire.User
	if err := s.decode(c, &u); err != nil {
		return err
	}
	u.OpenID = openid
	for _, r := range u.Roles {
		if r != "admin" && r != "operator" && r != "viewer" {
			return apiError(fiber.StatusBadRequest, fmt.Sprintf("role %q unknown (admin, operator, viewer)", r))
		}
	}
	if u.Roles == nil {
		u.Roles = []string{}
	}
	return s.onLeader(c, func(c *fiber.Ctx) error {
		u.Stamp = s.clock.Now()
		_, err := s.propose(c, &fsm.Command{Type: fsm.CmdUserPut, AtMs: s.now().UnixMilli(), User: &u})
		if err != nil {
			return err
		}
		return ok(c, u)
	})
}

// --- query helpers --------------------------------------------------------

// limitQuery reads ?limit= (wire.ParseLimit).
func limitQuery(c *fiber.Ctx, def, max int) (int, error) {
	n, err := wire.ParseLimit(c.Query("limit"), def, max)
	if err != nil {
		return 0, ruleErr(err)
	}
	return n, nil
}

// timeQuery accepts Unix milliseconds or RFC 3339 (wire.ParseTime).
func timeQuery(c *fiber.Ctx, name string) (int64, error) {
	ms, err := wire.ParseTime(name, c.Query(name))
	if err != nil {
		return 0, ruleErr(err)
	}
	return ms, nil
}

// ruleErr answers a refusal by the shared rules (pkg/wire) with the status
// pkg/httpenv gives it, as the edge does.
func ruleErr(err error) error {
	if st := httpenv.Status(err); st != 0 {
		return apiError(st, err.Error())
	}
	return err
}

// consumerBody refuses a consumer write over wire.MaxRequestBytes as the
// edge does (this server's own body limit is sized for sync pushes).
func consumerBody(c *fiber.Ctx) error {
	if n := len(c.Body()); n > wire.MaxRequestBytes {
		return ruleErr(wire.BodyTooLarge(wire.MaxRequestBytes))
	}
	return nil
}

func validHostPort(s string) bool {
	if len(s) == 0 || len(s) > 256 {
		return false
	}
	i := bytes.LastIndexByte([]byte(s), ':')
	if i <= 0 || i == len(s)-1 {
		return false
	}
	p, err := strconv.Atoi(s[i+1:])
	return err == nil && p > 0 && p < 65536
}

// --- policies -------------------------------------------------------------

func validPolicyName(n string) bool {
	return wire.ValidName(n) && len(n) > len(".rego") && n[len(n)-len(".rego"):] == ".rego" &&
		!(len(n) > len("_test.rego") && n[len(n)-len("_test.rego"):] == "_test.rego")
}

func (s *Server) listPolicies(c *fiber.Ctx) error {
	return s.read(c, func(c *fiber.Ctx) error {
		ps, err := s.fsm.Policies()
		if err != nil {
			return err
		}
		if ps == nil {
			ps = []wire.Policy{}
		}
		return ok(c, fiber.Map{"items": ps})
	})
}

// putPolicy stores a Rego module that every edge pulls; a body of "" deletes
// it. Once the cloud distributes any policy, edges use the cloud's set in
// place of their local policies.
func (s *Server) putPolicy(c *fiber.Ctx) error {
	name := c.Params("name")
	if !validPolicyName(name) {
		return apiError(fiber.StatusBadRequest, "policy name must match [A-Za-z0-9._-]{1,64}, end in .rego and not in _test.rego")
	}
	body, err := s.body(c)
	if err != nil {
		return err
	}
	if len(body) > 256<<10 {
		return apiError(fiber.StatusRequestEntityTooLarge, "policy larger than 256 KiB")
	}
	p := wire.Policy{Name: name, Rego: string(body)}
	return s.onLeader(c, func(c *fiber.Ctx) error {
		_, err := s.propose(c, &fsm.Command{Type: fsm.CmdPolicyPut, AtMs: s.now().UnixMilli(), Policy: &p})
		if err != nil {
			return err
		}
		return ok(c, fiber.Map{"name": name, "bytes": len(body)})
	})
}

// tagMap answers an object for a device without tags.
func tagMap(tags wire.Tags) map[string]string {
	if tags == nil {
		return map[string]string{}
	}
	return tags
}
