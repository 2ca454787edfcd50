package syncer

import (
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/pkg/cloud/client"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// pullScript is a cloud whose pull answers are scripted by the set
// versions each request sends; it records the requests.
type pullScript struct {
	mu   sync.Mutex
	reqs []pullSeen
}

type pullSeen struct {
	have    string
	wait    string
	sawHave bool
}

func (p *pullScript) serve(t *testing.T) *client.Client {
	t.Helper()
	return fakeCloud(t, func(w http.ResponseWriter, r *http.Request) {
		var data any
		switch r.URL.Path {
		case wire.PathHeartbeat:
			data = wire.HeartbeatResult{ServerTimeMs: time.Now().UnixMilli()}
		case wire.PathPull:
			q := r.URL.Query()
			p.mu.Lock()
			p.reqs = append(p.reqs, pullSeen{have: q.Get(wire.QueryHave), wait: q.Get(wire.QueryWait), sawHave: q.Has(wire.QueryHave)})
			p.mu.Unlock()
			have, _ := wire.ParseSetVersions(q.Get(wire.QueryHave))
			page := wire.PullPage{Changes: []wire.Change{}, Versions: &wire.SetVersions{Directory: "ep.2"}}
			switch have.Directory {
			case "":
				page.Directory = &wire.DirectoryDelta{Full: true, Edges: []wire.Edge{{ID: "a", Region: "1"}, {ID: "b", Region: "1"}}}
				page.Versions.Directory = "ep.1"
			case "ep.1":
				page.Directory = &wire.DirectoryDelta{Edges: []wire.Edge{{ID: "b", Region: "2"}}, Removed: []string{"a"}}
			default: // holds nothing new: as a held pull at the end of its wait
			}
			data = page
		default:
			http.NotFound(w, r)
			return
		}
		answer(w, data)
	})
}

// The syncer long-polls with the versions it holds, applies a directory
// delta to its cached directory, and keeps the versions across a restart.
func TestPullSendsVersionsAndAppliesDeltas(t *testing.T) {
	cloud := &pullScript{}
	cl := cloud.serve(t)
	st := openStore(t)
	s, err := New(Config{EdgeID: "e1", PullWait: 3 * time.Second}, Deps{Store: st, Client: cl})
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := s.pull(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	dir, _ := s.Edges(t.Context())
	if len(dir) != 1 || dir[0].ID != "b" || dir[0].Region != "2" {
		t.Fatalf("directory after a full copy and a delta: %+v", dir)
	}
	cloud.mu.Lock()
	reqs := append([]pullSeen(nil), cloud.reqs...)
	cloud.mu.Unlock()
	if len(reqs) != 2 || !reqs[0].sawHave || reqs[0].have != "" || reqs[0].wait != "3000" || reqs[1].have != "dir:ep.1" {
		t.Fatalf("pull requests: %+v", reqs)
	}
	// A restarted syncer holds the versions and the directory it stored.
	s2, err := New(Config{EdgeID: "e1", PullWait: 3 * time.Second}, Deps{Store: st, Client: cl})
	if err != nil {
		t.Fatal(err)
	}
	if s2.have.Directory != "ep.2" {
		t.Fatalf("versions after a restart: %+v", s2.have)
	}
	if dir, _ := s2.Edges(t.Context()); len(dir) != 1 || dir[0].ID != "b" {
		t.Fatalf("directory after a restart: %+v", dir)
	}
}

// Against a cloud that does not version sets or hold pulls (an older
// release), the directory comes whole and an empty pull counts as not held,
// so the pull loop pauses PullInterval instead of spinning.
func TestPullFromAnOlderCloud(t *testing.T) {
	cl := fakeCloud(t, func(w http.ResponseWriter, r *http.Request) {
		page := wire.PullPage{Changes: []wire.Change{}, Edges: []wire.Edge{{ID: "x"}}}
		answer(w, page)
	})
	s, err := New(Config{EdgeID: "e1", PullWait: 20 * time.Second}, Deps{Store: openStore(t), Client: cl})
	if err != nil {
		t.Fatal(err)
	}
	held, err := s.pull(t.Context())
	if err != nil || held {
		t.Fatalf("pull from an older cloud: held %v, err %v", held, err)
	}
	if dir, _ := s.Edges(t.Context()); len(dir) != 1 || dir[0].ID != "x" || s.have != (wire.SetVersions{}) {
		t.Fatalf("directory %+v, versions %+v", dir, s.have)
	}
}
