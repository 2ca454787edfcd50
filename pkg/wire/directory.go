package wire

import (
	"math"
	"net/url"
	"sort"
	"time"
)

// MaxAdvertise bounds an edge's advertise URL.
const MaxAdvertise = 512

// CheckAdvertise checks an edge's advertise URL, the base URL phones are
// sent to by the nearest-edge query: "" (the edge advertises none) or an
// absolute http or https URL with a host and without userinfo, of at most
// MaxAdvertise bytes. Anything else (javascript:, data:, a relative path,
// user:password@) would be handed to phones as a link. The edge's config
// and the cloud's heartbeat handling both apply it; Nearest also drops an
// invalid URL it finds in an older directory.
func CheckAdvertise(s string) error {
	if s == "" {
		return nil
	}
	if len(s) > MaxAdvertise {
		return invalid("advertise URL longer than %d bytes", MaxAdvertise)
	}
	u, err := url.Parse(s)
	switch {
	case err != nil:
		return invalid("advertise URL %q does not parse", clip(s))
	case u.Scheme != "http" && u.Scheme != "https":
		return invalid("advertise URL %q must be http:// or https://", clip(s))
	case u.Host == "" || u.Hostname() == "":
		return invalid("advertise URL %q has no host", clip(s))
	case u.User != nil:
		return invalid("advertise URL %q must not carry userinfo", clip(s))
	}
	return nil
}

// Edge is an entry of the edge directory: what the cloud records from each
// edge's heartbeats, serves on GET /api/v1/edges and in every pull page, and
// what an edge caches to answer nearest-edge queries while offline.
type Edge struct {
	ID              string    `json:"id"`
	Region          string    `json:"region,omitempty"`
	Location        *Location `json:"location,omitempty"`
	Advertise       string    `json:"advertise,omitempty"`
	Backlog         uint64    `json:"backlog"`
	LastHeartbeatMs int64     `json:"last_heartbeat_ms"`
	AckedSeq        uint64    `json:"acked_seq"`
	// LagMs is how far behind the cloud the edge's data is: the age of its
	// oldest unsynced change at its last heartbeat (0 when in sync).
	LagMs          int64 `json:"lag_ms"`
	OldestUnsynced int64 `json:"oldest_unsynced_ms,omitempty"`
	Healthy        bool  `json:"healthy"`
}

// MarkHealth sets Healthy (a heartbeat within fresh of nowMs) and LagMs on
// every entry; the cloud calls it before serving the directory.
func MarkHealth(dir []Edge, nowMs int64, fresh time.Duration) {
	cut := nowMs - fresh.Milliseconds()
	for i := range dir {
		e := &dir[i]
		e.Healthy = e.LastHeartbeatMs >= cut
		if e.OldestUnsynced > 0 {
			e.LagMs = max(e.LastHeartbeatMs-e.OldestUnsynced, 0)
		}
	}
}

// NearestEdge is one item of GET /api/v1/edges/nearest, the same at the edge
// and at the cloud: where a phone should send its requests.
type NearestEdge struct {
	ID string `json:"id"`
	// URL is the base URL the edge's API is reached at (its advertise
	// address); "" when the edge advertises none.
	URL      string    `json:"url"`
	Region   string    `json:"region"`
	Location *Location `json:"location"`
	// DistanceKm is the great-circle distance from the query point; null
	// when the edge has no location.
	DistanceKm *float64 `json:"distance_km"`
	Healthy    bool     `json:"healthy"`
	// LagMs and Backlog say how far the edge's data is behind the cloud, as
	// of its last heartbeat.
	LagMs   int64  `json:"lag_ms"`
	Backlog uint64 `json:"backlog"`
}

// Nearest ranks a directory for a client at here: healthy edges only (self,
// the id of the edge answering, counts as healthy: it is up), those with a
// location nearest first, then those without one by id; at most limit.
func Nearest(dir []Edge, here Location, self string, limit int) []NearestEdge {
	out := make([]NearestEdge, 0, min(len(dir), limit))
	for _, e := range dir {
		healthy := e.Healthy || (self != "" && e.ID == self)
		if !healthy {
			continue
		}
		n := NearestEdge{ID: e.ID, URL: e.Advertise, Region: e.Region, Healthy: true, LagMs: e.LagMs, Backlog: e.Backlog}
		if CheckAdvertise(n.URL) != nil {
			n.URL = "" // recorded before the rule existed
		}
		if e.Location != nil {
			l := *e.Location
			d := DistanceKm(here, l)
			n.Location, n.DistanceKm = &l, &d
		}
		out = append(out, n)
	}
	sort.SliceStable(out, func(i, j int) bool {
		a, b := out[i].DistanceKm, out[j].DistanceKm
		switch {
		case a != nil && b != nil && *a != *b:
			return *a < *b
		case (a == nil) != (b == nil):
			return a != nil
		}
		return out[i].ID < out[j].ID
	})
	if len(out) > limit {
		out = out[:limit]
	}
	return out
}

// DistanceKm is the great-circle (haversine) distance between a and b.
func DistanceKm(a, b Location) float64 {
	const earthKm = 6371.0088
	rad := math.Pi / 180
	dLat := (b.Lat - a.Lat) * rad
	dLng := (b.Lng - a.Lng) * rad
	h := math.Sin(dLat/2)*math.Sin(dLat/2) +
		math.Cos(a.Lat*rad)*math.Cos(b.Lat*rad)*math.Sin(dLng/2)*math.Sin(dLng/2)
	return 2 * earthKm * math.Asin(math.Min(1, math.Sqrt(h)))
}

func sortEdges(dir []Edge) { sort.Slice(dir, func(i, j int) bool { return dir[i].ID < dir[j].ID }) }
