package wire

import (
	"strings"
	"time"
)

// Versioned sets and long-polling pulls.
//
// The sets an edge keeps beside the change stream (the deployment's keys,
// the policies, the edge directory, the rules the cloud distributes to the
// edge's region) each have an opaque version. An edge that sends the versions it holds (the
// QueryHave parameter) gets a set in a pull page only when its version
// moved, and the directory as a delta; an edge that sends none (an older
// edge) gets every set whole in every page, as before.
//
// Such an edge may also ask the cloud to hold the pull (QueryWait): when
// nothing is there for it, the cloud answers once something is (a change
// addressed to it, a set that moved), or when the wait ends with an empty
// page. A desired-state write in the cloud so reaches a long-polling edge
// at once, and an idle edge costs one small request per wait.

// Query parameters of GET /sync/v1/pull.
const (
	QueryCursor = "cursor"
	QueryLimit  = "limit"
	// QueryHave carries the set versions the edge holds (SetVersions.Encode);
	// its presence marks an edge that understands versioned sets.
	QueryHave = "have"
	// QueryWait is how long, in milliseconds, the cloud may hold an empty
	// pull; the cloud caps it at its own limit.
	QueryWait = "wait_ms"
)

// MaxPullWait is the longest hold an edge asks for by default; the cloud's
// own cap (cloud-sync's pull_hold) may be shorter.
const MaxPullWait = 25 * time.Second

// SetVersions is the version of each versioned set: the cloud's in a pull
// page (PullPage.Versions), the edge's in its request (QueryHave). "" is the
// version of a set the side does not have (or of the empty policy set and
// the key set before a key exists).
type SetVersions struct {
	Directory string `json:"directory,omitempty"`
	Policies  string `json:"policies,omitempty"`
	Keys      string `json:"keys,omitempty"`
	// Rules is the version of the rules the cloud distributes to this edge
	// (those of its region and those of every region): it differs between
	// edges of different regions.
	Rules string `json:"rules,omitempty"`
}

// Set names in the QueryHave encoding.
const (
	setDirectory = "dir"
	setPolicies  = "policies"
	setKeys      = "keys"
	setRules     = "rules"
)

// Encode is the QueryHave form: "dir:V,policies:V,keys:V,rules:V", empty versions
// left out.
func (v SetVersions) Encode() string {
	var b strings.Builder
	add := func(name, ver string) {
		if ver == "" {
			return
		}
		if b.Len() > 0 {
			b.WriteByte(',')
		}
		b.WriteString(name)
		b.WriteByte(':')
		b.WriteString(ver)
	}
	add(setDirectory, v.Directory)
	add(setPolicies, v.Policies)
	add(setKeys, v.Keys)
	add(setRules, v.Rules)
	return b.String()
}

// maxVersion bounds one version token.
const maxVersion = 64

// ParseSetVersions reads the QueryHave form. Unknown set names are ignored
// (a newer edge may hold sets this cloud does not distribute); a malformed
// item is ErrBadParam.
func ParseSetVersions(s string) (SetVersions, error) {
	var v SetVersions
	if s == "" {
		return v, nil
	}
	for _, item := range strings.Split(s, ",") {
		name, ver, ok := strings.Cut(item, ":")
		if !ok || len(ver) > maxVersion || !validVersion(ver) {
			return SetVersions{}, BadParam(QueryHave, "%q is not name:version", clip(item))
		}
		switch name {
		case setDirectory:
			v.Directory = ver
		case setPolicies:
			v.Policies = ver
		case setKeys:
			v.Keys = ver
		case setRules:
			v.Rules = ver
		}
	}
	return v, nil
}

func validVersion(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '.' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// DirectoryDelta is the directory in a versioned pull page: the entries
// that changed since the version the edge holds and the ids that left; or,
// with Full, the whole directory, which replaces the edge's copy (the edge
// held none, or a version from another cloud node or leadership, which
// deltas cannot start from).
type DirectoryDelta struct {
	Full    bool     `json:"full,omitempty"`
	Edges   []Edge   `json:"edges,omitempty"`
	Removed []string `json:"removed,omitempty"`
}

// Apply returns dir with the delta applied, sorted by id.
func (d *DirectoryDelta) Apply(dir []Edge) []Edge {
	byID := make(map[string]Edge, len(dir)+len(d.Edges))
	if !d.Full {
		for _, e := range dir {
			byID[e.ID] = e
		}
	}
	for _, id := range d.Removed {
		delete(byID, id)
	}
	for _, e := range d.Edges {
		byID[e.ID] = e
	}
	out := make([]Edge, 0, len(byID))
	for _, e := range byID {
		out = append(out, e)
	}
	sortEdges(out)
	return out
}

// SortEdges orders a directory by id, the order the cloud serves it in.
func SortEdges(dir []Edge) { sortEdges(dir) }
