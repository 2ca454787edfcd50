package httpapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/cloud/service"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/httpenv"
	"github.com/outpost-edge/outpost/pkg/ident"
	"github.com/outpost-edge/outpost/pkg/wire"
)

const (
	hdrNextCursor = "X-Outpost-Next-Cursor"
	// hdrEarliestCursor names, with a 410 from export, the earliest cursor
	// whose changes are still kept.
	hdrEarliestCursor = "X-Outpost-Earliest-Cursor"
)

// --- health and cluster ---------------------------------------------------

func (s *Server) ready(c *fiber.Ctx) error {
	if _, _, ok := s.svc.Leader(); !ok {
		return &httpError{status: fiber.StatusServiceUnavailable, msg: "no raft leader known yet", retryAfter: 1}
	}
	return ok(c, fiber.Map{"status": "ready", "applied_index": s.svc.AppliedIndex()})
}

func (s *Server) status(c *fiber.Ctx) error {
	return s.read(c, func(c *fiber.Ctx) error {
		st, err := s.svc.Status(c.UserContext())
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
		err := s.svc.Join(c.UserContext(), req.ID, req.RaftAddr, req.HTTPAddr)
		switch {
		case errors.Is(err, service.ErrConflict):
			return apiError(fiber.StatusConflict, err.Error())
		case err != nil:
			return err
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
		err := s.svc.Remove(c.UserContext(), id)
		switch {
		case errors.Is(err, service.ErrNoSuchNode):
			return apiError(fiber.StatusNotFound, fmt.Sprintf("node %q is not a cluster member", id))
		case err != nil:
			return err
		}
		return ok(c, fiber.Map{"removed": id})
	})
}

func (s *Server) snapshot(c *fiber.Ctx) error {
	applied, err := s.svc.Snapshot(c.UserContext())
	if err != nil {
		return err
	}
	return ok(c, fiber.Map{"applied_index": applied})
}

// --- sync API -------------------------------------------------------------

func (s *Server) push(c *fiber.Ctx) error {
	edge := c.Locals("edge").(string)
	return s.onLeader(c, func(c *fiber.Ctx) error {
		ctx, release, err := s.admit(c)
		if err != nil {
			return err
		}
		defer release()
		var b wire.PushBatch
		if err := s.decodePush(c, &b); err != nil {
			return err
		}
		// b is not used past Push, so its decoded changes are garbage once
		// the service has queued them encoded.
		first, as := b.FirstSeq, b.Edge
		out, err := s.svc.Push(ctx, edge, &b)
		var gap *service.SeqGapError
		switch {
		case errors.As(err, &gap):
			return &httpError{status: fiber.StatusConflict,
				msg:     fmt.Sprintf("sequence gap: the cloud expects sequence %d next from edge %q, batch starts at %d", gap.Expected, edge, first),
				headers: map[string]string{wire.HeaderExpectedSeq: strconv.FormatUint(gap.Expected, 10)}}
		case errors.Is(err, service.ErrSeqConflict):
			// Not a gap (no expected-sequence header): rewinding cannot
			// help, so the edge must not treat it as one.
			return apiError(fiber.StatusUnprocessableEntity, err.Error())
		case errors.Is(err, service.ErrWrongEdge):
			return wrongEdge(edge, "push", as)
		case err != nil:
			return err
		}
		return ok(c, out.PushResult)
	})
}

// state applies an edge's state changes ahead of its sequenced stream.
func (s *Server) state(c *fiber.Ctx) error {
	edge := c.Locals("edge").(string)
	return s.onLeader(c, func(c *fiber.Ctx) error {
		ctx, release, err := s.admit(c)
		if err != nil {
			return err
		}
		defer release()
		var b wire.StateBatch
		if err := s.decodeBatch(c, &b); err != nil {
			return err
		}
		out, err := s.svc.State(ctx, edge, &b)
		switch {
		case errors.Is(err, service.ErrWrongEdge):
			return wrongEdge(edge, "push", b.Edge)
		case err != nil:
			return err
		}
		return ok(c, out.StateResult)
	})
}

// wrongEdge refuses a sync request whose body names another edge than the
// token's.
func wrongEdge(edge, act, as string) error {
	return apiError(fiber.StatusForbidden, fmt.Sprintf("this token belongs to edge %q; it may not %s as %q", edge, act, as))
}

// admit admits a sync write into the leader's apply queue by its body's
// size, before the body is decompressed or decoded (Sync.Admit): a write
// the queue has no room for is refused for the price of reading it.
func (s *Server) admit(c *fiber.Ctx) (context.Context, func(), error) {
	return s.svc.Admit(c.UserContext(), c.Locals("edge").(string), len(c.Request().Body()))
}

func (s *Server) pull(c *fiber.Ctx) error {
	edge := c.Locals("edge").(string)
	limit, err := limitQuery(c, 500, 5000)
	if err != nil {
		return err
	}
	req := service.PullRequest{Cursor: c.Query(wire.QueryCursor), Limit: limit}
	if c.Request().URI().QueryArgs().Has(wire.QueryHave) {
		have, err := wire.ParseSetVersions(c.Query(wire.QueryHave))
		if err != nil {
			return ruleErr(err)
		}
		req.Have = &have
	}
	if w := c.Query(wire.QueryWait); w != "" {
		ms, err := strconv.ParseInt(w, 10, 64)
		if err != nil || ms < 0 {
			return apiError(fiber.StatusBadRequest, wire.QueryWait+" must be a number of milliseconds")
		}
		req.Wait = time.Duration(min(ms, int64(time.Hour/time.Millisecond))) * time.Millisecond
	}
	// The leader serves pulls: it keeps the soft state the directory is
	// built from and the pull positions. A follower holds an empty pull
	// itself, on its replica, and forwards it once there is something or
	// the wait ended, asking the leader to hold it only briefly (its own
	// replica may be a moment ahead of the leader's) or not at all: a held
	// pull so never holds a connection between nodes. A held pull ends
	// when the server shuts down.
	hold := min(req.Wait, s.cfg.PullHold)
	if hold > 0 && req.Have != nil && !s.svc.IsLeader() && c.Get(hdrForwarded) == "" {
		next := time.Duration(0)
		if s.svc.AwaitPull(s.base, edge, req) {
			next = min(hold, time.Second)
		}
		if s.base.Err() != nil {
			return &httpError{status: fiber.StatusServiceUnavailable, msg: "this node is shutting down", retryAfter: 1}
		}
		req.Wait, hold = next, next
		c.Request().URI().QueryArgs().Set(wire.QueryWait, strconv.FormatInt(next.Milliseconds(), 10))
	}
	return s.onLeaderHeld(c, hold, func(c *fiber.Ctx) error {
		page, err := s.svc.Pull(s.base, edge, req)
		if errors.Is(err, service.ErrBadCursor) {
			return apiError(fiber.StatusBadRequest, "cursor is not one this API issued; start from an empty cursor")
		}
		if err != nil {
			return err
		}
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
		res, err := s.svc.Heartbeat(c.UserContext(), edge, &h)
		switch {
		case errors.Is(err, service.ErrWrongEdge):
			return wrongEdge(edge, "heartbeat", h.Edge)
		case err != nil:
			return err
		}
		return ok(c, res)
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
		d, err := s.svc.Device(c.UserContext(), id)
		if errors.Is(err, service.ErrNotFound) {
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
		items, next, err := s.svc.Readings(c.UserContext(), fsm.ReadingsQuery{Device: id, FromMs: from, ToMs: to,
			Metric: c.Query("metric"), Limit: limit, Cursor: cursor})
		if errors.Is(err, service.ErrBadCursor) {
			return apiError(fiber.StatusBadRequest, "cursor does not belong to this device's readings; start without one")
		}
		if err != nil {
			return err
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
		return device(c)(s.svc.PutDesired(c.UserContext(), id, body.State))
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
		return device(c)(s.svc.PutMeta(c.UserContext(), id, m))
	})
}

// device answers a device write with the record after it.
func device(c *fiber.Ctx) func(*fsm.Device, error) error {
	return func(d *fsm.Device, err error) error {
		if err != nil {
			return err
		}
		return ok(c, view(d))
	}
}

// edges and nearest run on the leader, which keeps the soft state (health,
// backlog, lag) of the directory.
func (s *Server) edges(c *fiber.Ctx) error {
	return s.leaderRead(c, func(c *fiber.Ctx) error {
		edges, err := s.svc.Edges(c.UserContext())
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
	return s.leaderRead(c, func(c *fiber.Ctx) error {
		all, err := s.svc.Edges(c.UserContext())
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
	return s.read(c, func(c *fiber.Ctx) error {
		var buf bytes.Buffer
		enc := json.NewEncoder(&buf)
		next, err := s.svc.Export(c.UserContext(), since, limit, func(r *fsm.ExportRecord) error {
			if buf.Len() > 16<<20 {
				return errExportFull // bound the page's memory; the cursor resumes
			}
			return enc.Encode(r)
		})
		if errors.Is(err, service.ErrBadCursor) {
			return apiError(fiber.StatusBadRequest, fmt.Sprintf("since %q is not an export cursor (INDEX or INDEX.N from a previous export)", since))
		}
		if ce := (*fsm.CompactedError)(nil); errors.As(err, &ce) {
			// Retention deleted changes after since: skipping them silently
			// would lose data for the consumer.
			c.Set(hdrEarliestCursor, ce.Earliest)
			return apiError(fiber.StatusGone, fmt.Sprintf("since %q: the changes after it were compacted away by retention (log_retention); the earliest available cursor is %q", since, ce.Earliest))
		}
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
		u, err := s.svc.User(c.UserContext(), openid)
		if errors.Is(err, service.ErrNotFound) {
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
		stored, err := s.svc.PutUser(c.UserContext(), u)
		if err != nil {
			return err
		}
		return ok(c, stored)
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
		ps, err := s.svc.Policies(c.UserContext())
		if err != nil {
			return err
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
	if len(body) > maxPolicyBytes {
		return apiError(fiber.StatusRequestEntityTooLarge, "policy larger than 256 KiB")
	}
	p := wire.Policy{Name: name, Rego: string(body)}
	return s.onLeader(c, func(c *fiber.Ctx) error {
		if err := s.svc.PutPolicy(c.UserContext(), p); err != nil {
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
