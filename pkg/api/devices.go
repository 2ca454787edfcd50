package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"time"

	"github.com/gofiber/fiber/v2"
	"github.com/gofiber/fiber/v2/utils"

	"github.com/outpost-edge/outpost/pkg/httpenv"
	"github.com/outpost-edge/outpost/pkg/ident"
	"github.com/outpost-edge/outpost/pkg/policy"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// Policy actions.
const (
	actList         = "device.list"
	actRead         = "device.read"
	actWriteDesired = "device.write_desired"
	actWriteMeta    = "device.write_meta"
	actUserWrite    = "user.write"
	actEdgeRead     = "edge.read"
)

const badDeviceID = "device id must match [A-Za-z0-9._-]{1,64}"

// deviceView is the API's device representation.
type deviceView struct {
	ID             string                     `json:"id"`
	EdgeID         string                     `json:"edge_id"`
	FirstSeen      int64                      `json:"first_seen"`
	LastSeen       int64                      `json:"last_seen"`
	Online         bool                       `json:"online"`
	Region         string                     `json:"region"`
	Tags           map[string]string          `json:"tags"`
	Owners         []string                   `json:"owners"`
	Reported       map[string]json.RawMessage `json:"reported"`
	Desired        map[string]json.RawMessage `json:"desired"`
	DesiredVersion string                     `json:"desired_version,omitempty"`
	// Latest is the newest reading (null if none), with include=latest.
	Latest json.RawMessage `json:"latest,omitempty"`
}

// online says whether a device is connected: to the embedded broker
// (Presence), or, in external-broker mode, seen within OnlineWindow.
func (s *Server) online(d *store.Device) bool {
	if s.deps.Presence != nil {
		return s.deps.Presence.Online(d.ID)
	}
	return d.LastSeen > 0 && s.cfg.Now().UnixMilli()-d.LastSeen <= s.cfg.OnlineWindow.Milliseconds()
}

func (s *Server) viewOf(d *store.Device) deviceView {
	v := deviceView{
		ID: d.ID, EdgeID: d.EdgeID, FirstSeen: d.FirstSeen, LastSeen: d.LastSeen, Online: s.online(d),
		Region: d.Meta.Region, Tags: d.Meta.Tags, Owners: d.Meta.Owners,
		Reported: d.Reported.State(), Desired: d.Desired.State(),
	}
	if v.Tags == nil {
		v.Tags = map[string]string{}
	}
	if v.Owners == nil {
		v.Owners = []string{}
	}
	if ver := d.Desired.Version(); !ver.IsZero() {
		v.DesiredVersion = ver.String()
	}
	return v
}

func resourceOf(d *store.Device) policy.Resource {
	return policy.Resource{Kind: "device", ID: d.ID, Owners: d.Meta.Owners, Region: d.Meta.Region, Tags: d.Meta.Tags}
}

// unknownDevice is the resource a missing device is authorised as: no
// owners, region or tags, so only a caller allowed to act on any device may
// learn that it does not exist.
func unknownDevice(id string) policy.Resource {
	return policy.Resource{Kind: "device", ID: id, Owners: []string{}, Tags: map[string]string{}}
}

// device loads the path's device and checks action on it. A missing device
// is authorised as unknownDevice before the 404, so a caller who may not
// read it gets the same 403 (with the policy's reason) whether the id
// exists or not: the answer is no oracle of which ids exist.
func (s *Server) device(c *fiber.Ctx, action string) (*store.Device, error) {
	id := c.Params("id")
	if !ident.DeviceID(id) {
		return nil, fail(c, fiber.StatusBadRequest, badDeviceID)
	}
	d, err := s.deps.Store.Device(id)
	if errors.Is(err, store.ErrNotFound) {
		if err := s.authorize(c, action, unknownDevice(id)); err != nil {
			return nil, deny(c, err)
		}
		return nil, fail(c, fiber.StatusNotFound, "device "+id+" not found")
	}
	if err != nil {
		return nil, err
	}
	if err := s.authorize(c, action, resourceOf(d)); err != nil {
		return nil, deny(c, err)
	}
	return d, nil
}

type devicePage struct {
	Items      []deviceView `json:"items"`
	NextCursor string       `json:"next_cursor"`
}

func (s *Server) listDevices(c *fiber.Ctx) error {
	limit, err := wire.ParseLimit(c.Query("limit"), 100, s.cfg.MaxPage)
	if err != nil {
		return fail(c, fiber.StatusBadRequest, err.Error())
	}
	var withLatest bool
	switch inc := c.Query("include"); inc {
	case "":
	case "latest":
		withLatest = true
	default:
		return fail(c, fiber.StatusBadRequest, fmt.Sprintf("include: %q is not one of: latest", truncate(inc)))
	}
	after := c.Query("cursor")
	if after != "" && !ident.DeviceID(after) {
		return fail(c, fiber.StatusBadRequest, "cursor: malformed; pass next_cursor from the previous page")
	}
	// Policy filters the list item by item; bound the scan so a caller who
	// may see few devices cannot make one request walk the whole registry.
	budget := 10*limit + 1000
	page := devicePage{Items: make([]deviceView, 0, min(limit, 256))}
	var last string
	var ferr error
	scanned := 0
	err = s.deps.Store.Devices(after, func(d *store.Device) bool {
		if len(page.Items) == limit || scanned == budget {
			page.NextCursor = last
			return false
		}
		scanned++
		last = d.ID
		if err := s.authorize(c, actList, resourceOf(d)); err != nil {
			var denied errDenied
			if !errors.As(err, &denied) {
				ferr = err
				return false
			}
			return true
		}
		page.Items = append(page.Items, s.viewOf(d))
		return true
	})
	if err == nil {
		err = ferr
	}
	if err != nil {
		return err
	}
	if withLatest {
		// One request for a list screen (wx.request allows 10 at once):
		// the newest reading of each device on the page.
		for i := range page.Items {
			v := &page.Items[i]
			r, err := s.deps.Store.Latest(v.ID)
			switch {
			case errors.Is(err, store.ErrNotFound):
				v.Latest = json.RawMessage("null")
			case err != nil:
				return err
			default:
				v.Latest = appendReading(nil, r)
			}
		}
	}
	revalidate(c)
	return ok(c, page)
}

func (s *Server) getDevice(c *fiber.Ctx) error {
	d, err := s.device(c, actRead)
	if d == nil {
		return err
	}
	revalidate(c)
	return ok(c, s.viewOf(d))
}

func (s *Server) readings(c *fiber.Ctx) error {
	var q store.ReadingsQuery
	var err error
	if q.From, err = wire.ParseTime("from", c.Query("from")); err != nil {
		return fail(c, fiber.StatusBadRequest, err.Error())
	}
	if q.To, err = wire.ParseTime("to", c.Query("to")); err != nil {
		return fail(c, fiber.StatusBadRequest, err.Error())
	}
	if q.To != 0 && q.To < q.From {
		return fail(c, fiber.StatusBadRequest, "to must not be before from")
	}
	if q.Limit, err = wire.ParseLimit(c.Query("limit"), 100, s.cfg.MaxPage); err != nil {
		return fail(c, fiber.StatusBadRequest, err.Error())
	}
	q.Metric = c.Query("metric")
	if q.Metric != "" && !validMetric(q.Metric) {
		return fail(c, fiber.StatusBadRequest, "metric must match [A-Za-z0-9._-]{1,64}")
	}
	if q.Cursor, err = wire.ParseCursor(c.Query("cursor")); err != nil {
		return fail(c, fiber.StatusBadRequest, err.Error())
	}
	d, err := s.device(c, actRead)
	if d == nil {
		return err
	}
	page, err := s.deps.Store.Readings(d.ID, q)
	if errors.Is(err, store.ErrBadCursor) {
		return fail(c, fiber.StatusBadRequest, "cursor: malformed; pass next_cursor from the previous page")
	}
	if err != nil {
		return err
	}
	// Hand-rolled encoding: this is the hot read path, and reflection-based
	// encoding of 1000 readings costs more than the store scan.
	buf := httpenv.AppendOK(make([]byte, 0, 64+len(page.Items)*48))
	buf = append(buf, `{"items":[`...)
	for i, r := range page.Items {
		if i > 0 {
			buf = append(buf, ',')
		}
		buf = appendReading(buf, r)
	}
	buf = append(buf, `],"next_cursor":`...)
	buf = strconv.AppendQuote(buf, page.Next)
	if q.To != 0 && q.To <= s.cfg.Now().UnixMilli() {
		// A closed range: its page changes only if a late reading lands
		// in it. An open one changes with every reading and is not worth
		// an ETag.
		revalidate(c)
	}
	return httpenv.SendOK(c, append(buf, '}'))
}

func appendReading(buf []byte, r store.Reading) []byte {
	buf = append(buf, `{"ts":`...)
	buf = strconv.AppendInt(buf, r.TS, 10)
	if r.ID != "" {
		buf = append(buf, `,"id":`...)
		buf = appendJSONString(buf, r.ID)
	}
	buf = append(buf, `,"metrics":{`...)
	for j, m := range r.Metrics {
		if j > 0 {
			buf = append(buf, ',')
		}
		buf = append(buf, '"')
		buf = append(buf, m.Name...) // names are [A-Za-z0-9._-]
		buf = append(buf, `":`...)
		buf = appendFloat(buf, m.Value)
	}
	return append(buf, "}}"...)
}

func appendFloat(buf []byte, f float64) []byte {
	if math.IsInf(f, 0) || math.IsNaN(f) {
		return append(buf, "null"...)
	}
	return strconv.AppendFloat(buf, f, 'g', -1, 64)
}

// appendJSONString quotes s as JSON: strconv's quoting agrees with JSON for
// printable ASCII, the common case; anything else goes through encoding/json.
func appendJSONString(buf []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x7f {
			b, _ := json.Marshal(s)
			return append(buf, b...)
		}
	}
	return strconv.AppendQuote(buf, s)
}

func (s *Server) latest(c *fiber.Ctx) error {
	d, err := s.device(c, actRead)
	if d == nil {
		return err
	}
	r, err := s.deps.Store.Latest(d.ID)
	if errors.Is(err, store.ErrNotFound) {
		return fail(c, fiber.StatusNotFound, "device "+d.ID+" has no readings yet")
	}
	if err != nil {
		return err
	}
	revalidate(c)
	return httpenv.SendOK(c, appendReading(httpenv.AppendOK(make([]byte, 0, 128)), r))
}

const maxStatsBuckets = 10000

func (s *Server) stats(c *fiber.Ctx) error {
	metric := c.Query("metric")
	if !validMetric(metric) {
		return fail(c, fiber.StatusBadRequest, "metric is required and must match [A-Za-z0-9._-]{1,64}")
	}
	from, err := wire.ParseTime("from", c.Query("from"))
	if err != nil {
		return fail(c, fiber.StatusBadRequest, err.Error())
	}
	to, err := wire.ParseTime("to", c.Query("to"))
	if err != nil {
		return fail(c, fiber.StatusBadRequest, err.Error())
	}
	if to == 0 {
		to = time.Now().UnixMilli()
	}
	if c.Query("from") == "" {
		from = to - int64(24*time.Hour/time.Millisecond)
	}
	if to < from {
		return fail(c, fiber.StatusBadRequest, "to must not be before from")
	}
	step, err := parseStep(c.Query("step"))
	if err != nil {
		return fail(c, fiber.StatusBadRequest, err.Error())
	}
	if step == 0 {
		step = defaultStep(from, to)
	}
	if (to-from)/step+1 > maxStatsBuckets {
		return fail(c, fiber.StatusBadRequest, fmt.Sprintf("step too small: the range would have more than %d buckets", maxStatsBuckets))
	}
	d, err := s.device(c, actRead)
	if d == nil {
		return err
	}
	buckets, err := s.deps.Store.Stats(d.ID, metric, from, to, step)
	if err != nil {
		return err
	}
	revalidate(c)
	return ok(c, fiber.Map{"metric": metric, "from": from, "to": to, "step": step, "buckets": buckets})
}

// defaultStep aims at about 120 buckets, in whole minutes so rollups answer.
func defaultStep(from, to int64) int64 {
	const minute = int64(time.Minute / time.Millisecond)
	step := (to - from + 119) / 120
	step = (step + minute - 1) / minute * minute
	return max(step, minute)
}

type desiredRequest struct {
	State map[string]json.RawMessage `json:"state"`
}

func (s *Server) putDesired(c *fiber.Ctx) error {
	id := c.Params("id")
	if !ident.DeviceID(id) {
		return fail(c, fiber.StatusBadRequest, badDeviceID)
	}
	var req desiredRequest
	if err := decodeBody(c, &req); err != nil {
		return fail(c, fiber.StatusBadRequest, err.Error())
	}
	if err := wire.ValidateState(req.State); err != nil {
		return failRule(c, err)
	}
	res := policy.Resource{Kind: "device", ID: id, Owners: []string{}, Region: s.cfg.Region, Tags: map[string]string{}}
	cur, err := s.deps.Store.Device(id)
	switch {
	case err == nil:
		res = resourceOf(cur)
	case !errors.Is(err, store.ErrNotFound):
		return err
	}
	if err := s.authorize(c, actWriteDesired, res); err != nil {
		return deny(c, err)
	}
	id = utils.CopyString(id)
	d, err := s.deps.Store.SetDesiredBy(id, req.State, actorOf(c))
	if err != nil {
		return err
	}
	s.publishDesired(d)
	return ok(c, s.viewOf(d))
}

// publishDesired sends the whole desired state as a retained downlink, so a
// device that connects later gets the latest.
func (s *Server) publishDesired(d *store.Device) {
	if s.deps.Downlink == nil {
		return
	}
	payload, err := wire.DesiredPayload(d.Desired)
	if err == nil {
		err = s.deps.Downlink.Publish(wire.DesiredTopic(d.ID), payload, true, wire.DesiredQoS)
	}
	if err != nil {
		// The write is durable and queued for the cloud; the device gets it
		// with the next publish of its desired state.
		s.log.Warn("desired-state downlink failed", "device", d.ID, "err", err)
	}
}

type metaRequest struct {
	Owners []string          `json:"owners"`
	Region string            `json:"region"`
	Tags   map[string]string `json:"tags"`
}

func (s *Server) putMeta(c *fiber.Ctx) error {
	id := c.Params("id")
	if !ident.DeviceID(id) {
		return fail(c, fiber.StatusBadRequest, badDeviceID)
	}
	var req metaRequest
	if err := decodeBody(c, &req); err != nil {
		return fail(c, fiber.StatusBadRequest, err.Error())
	}
	meta := wire.Meta{Owners: req.Owners, Region: req.Region, Tags: req.Tags}
	if err := meta.Validate(); err != nil {
		return failRule(c, err)
	}
	res := policy.Resource{Kind: "device", ID: id, Owners: req.Owners, Region: req.Region, Tags: req.Tags}
	if err := s.authorize(c, actWriteMeta, res); err != nil {
		return deny(c, err)
	}
	meta.Normalize()
	d, err := s.deps.Store.SetMetaBy(utils.CopyString(id), store.DeviceMeta{Owners: meta.Owners, Region: meta.Region, Tags: meta.Tags}, actorOf(c))
	if err != nil {
		return err
	}
	if s.deps.DataChanged != nil {
		s.deps.DataChanged()
	}
	return ok(c, s.viewOf(d))
}

type userRequest struct {
	Roles   []string `json:"roles"`
	Regions []string `json:"regions"`
}

var knownRoles = map[string]bool{"admin": true, "operator": true, "viewer": true}

func (s *Server) putUser(c *fiber.Ctx) error {
	openid := c.Params("openid")
	if !ident.OpenID(openid) {
		return fail(c, fiber.StatusBadRequest, "openid must be 1 to 128 printable characters without '/', '\\', '%' or '..'")
	}
	var req userRequest
	if err := decodeBody(c, &req); err != nil {
		return fail(c, fiber.StatusBadRequest, err.Error())
	}
	for _, r := range req.Roles {
		if !knownRoles[r] {
			return fail(c, fiber.StatusBadRequest, fmt.Sprintf("roles: %q is not one of admin, operator, viewer", truncate(r)))
		}
	}
	if len(req.Regions) > 256 {
		return fail(c, fiber.StatusBadRequest, "regions: at most 256")
	}
	for _, r := range req.Regions {
		if !ident.Valid(r, 64) {
			return fail(c, fiber.StatusBadRequest, fmt.Sprintf("regions: %q must match [A-Za-z0-9._-]{1,64}", truncate(r)))
		}
	}
	if err := s.authorize(c, actUserWrite, policy.Resource{Kind: "user", ID: openid, Owners: []string{}, Tags: map[string]string{}}); err != nil {
		return deny(c, err)
	}
	u := store.User{OpenID: utils.CopyString(openid), Roles: nonNil(req.Roles), Regions: nonNil(req.Regions)}
	if err := s.deps.Store.PutUserBy(u, actorOf(c)); err != nil {
		return err
	}
	s.users.forget(u.OpenID)
	if s.deps.DataChanged != nil {
		s.deps.DataChanged()
	}
	return ok(c, fiber.Map{"openid": u.OpenID, "roles": u.Roles, "regions": u.Regions})
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func (s *Server) edge(c *fiber.Ctx) error {
	if err := s.authorize(c, actEdgeRead, policy.Resource{Kind: "edge", ID: s.cfg.EdgeID, Owners: []string{}, Region: s.cfg.Region, Tags: map[string]string{}}); err != nil {
		return deny(c, err)
	}
	counts := s.deps.Store.Counts()
	cloud := fiber.Map{"configured": false, "connected": false, "last_sync": nil}
	if s.deps.Sync != nil {
		connected, last := s.deps.Sync.Status()
		var lastMs *int64 // Unix ms of the last successful sync, null if never
		if !last.IsZero() {
			ms := last.UnixMilli()
			lastMs = &ms
		}
		cloud = fiber.Map{"configured": true, "connected": connected, "last_sync": lastMs}
	}
	cloud["backlog"] = counts.OutboxBacklog
	var oldestAge *int64
	if oldest, err := s.deps.Store.OldestUnsynced(); err == nil && !oldest.IsZero() {
		age := max(time.Now().UnixMilli()-oldest.WallMs(), 0)
		oldestAge = &age
	}
	cloud["oldest_unsynced_age_ms"] = oldestAge
	return ok(c, fiber.Map{
		"edge_id": s.cfg.EdgeID, "region": s.cfg.Region, "location": s.cfg.Location, "advertise": s.cfg.Advertise,
		"cloud":   cloud,
		"devices": counts.Devices, "readings": counts.Readings, "dead_letters": counts.DeadLetters,
	})
}

func (s *Server) nearest(c *fiber.Ctx) error {
	here, err := wire.ParseLocation(c.Query("lat"), c.Query("lng"))
	if err != nil {
		return fail(c, fiber.StatusBadRequest, err.Error())
	}
	limit, err := wire.ParseLimit(c.Query("limit"), 5, 100)
	if err != nil {
		return fail(c, fiber.StatusBadRequest, err.Error())
	}
	if err := s.authorize(c, actEdgeRead, policy.Resource{Kind: "edge", ID: s.cfg.EdgeID, Owners: []string{}, Region: s.cfg.Region, Tags: map[string]string{}}); err != nil {
		return deny(c, err)
	}
	if s.deps.Directory != nil {
		dir, err := s.deps.Directory.Edges(c.UserContext())
		if err != nil {
			return err
		}
		return ok(c, fiber.Map{"items": wire.Nearest(dir, here, s.cfg.EdgeID, limit)})
	}
	// Standalone: this edge is the whole directory.
	self := wire.Edge{ID: s.cfg.EdgeID, Region: s.cfg.Region, Location: s.cfg.Location, Advertise: s.cfg.Advertise, Healthy: true}
	return ok(c, fiber.Map{"items": wire.Nearest([]wire.Edge{self}, here, s.cfg.EdgeID, limit)})
}
