package client

import (
	"context"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"

	"github.com/outpost-edge/outpost/pkg/wire"
)

// node is a cloud node that answers heartbeats, naming leader (if set) as
// a follower names the leader it forwarded to.
func node(t *testing.T, leader *string) (*httptest.Server, *atomic.Int32) {
	t.Helper()
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		if *leader != "" {
			w.Header().Set(wire.HeaderLeader, *leader)
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"code":0,"message":"ok","data":{"acked_seq":0,"server_time_ms":1}}`))
	}))
	t.Cleanup(srv.Close)
	return srv, &calls
}

// A follower's leader hint moves the client to the leader when the leader
// is one of its URLs, and is ignored otherwise.
func TestFollowsLeaderHint(t *testing.T) {
	cases := []struct {
		name       string
		hint       func(leaderURL string) string
		wantLeader int32 // calls the leader gets of the 3 made
	}{
		{"hint in the node list", func(u string) string { return u + "/" }, 2},
		{"hint outside the node list", func(string) string { return "http://10.9.9.9:1" }, 0},
		{"no hint", func(string) string { return "" }, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			none := ""
			leader, leaderCalls := node(t, &none)
			hint := tc.hint(leader.URL)
			follower, followerCalls := node(t, &hint)
			c, err := New([]string{follower.URL, leader.URL}, "tok", WithRounds(1))
			if err != nil {
				t.Fatal(err)
			}
			for range 3 {
				if _, err := c.Heartbeat(context.Background(), &wire.Heartbeat{Edge: "e1"}); err != nil {
					t.Fatal(err)
				}
			}
			if got := leaderCalls.Load(); got != tc.wantLeader {
				t.Errorf("leader got %d of 3 calls (follower %d), want %d", got, followerCalls.Load(), tc.wantLeader)
			}
		})
	}
}
