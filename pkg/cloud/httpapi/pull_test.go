package httpapi

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/pkg/cloud/service"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// The pull route passes the edge's set versions and wait to the service,
// and a pull the service holds ends when the server shuts down, which it
// does not delay.
func TestPullHeldUntilShutdown(t *testing.T) {
	reqs := make(chan service.PullRequest, 1)
	f := &fakeService{pull: func(ctx context.Context, _ string, req service.PullRequest) (wire.PullPage, error) {
		reqs <- req
		<-ctx.Done() // held: nothing for the edge
		return wire.PullPage{Changes: []wire.Change{}}, nil
	}}
	sv := serveReal(t, f, Config{PullHold: time.Minute}, nil)
	type result struct {
		status int
		err    error
	}
	done := make(chan result, 1)
	go func() {
		req, _ := http.NewRequest(http.MethodGet, "http://"+sv.addr+"/sync/v1/pull?cursor=&have=dir:ep.3,keys:k1&wait_ms=60000", nil)
		req.Header.Set("Authorization", "Bearer "+edgeToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			done <- result{0, err}
			return
		}
		resp.Body.Close()
		done <- result{resp.StatusCode, nil}
	}()
	var got service.PullRequest
	select {
	case got = <-reqs:
	case <-time.After(10 * time.Second):
		t.Fatal("the pull did not reach the service")
	}
	if got.Have == nil || got.Have.Directory != "ep.3" || got.Have.Keys != "k1" || got.Wait != time.Minute {
		t.Fatalf("service got %+v (have %+v)", got, got.Have)
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := sv.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("shutdown took %s with a held pull", d)
	}
	select {
	case r := <-done:
		if r.err != nil || r.status != http.StatusOK {
			t.Fatalf("held pull at shutdown: %d %v", r.status, r.err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the held pull did not return at shutdown")
	}
}

// An edge that sends no versions is an older edge: no Have, no wait.
func TestPullWithoutVersions(t *testing.T) {
	reqs := make(chan service.PullRequest, 1)
	f := &fakeService{pull: func(_ context.Context, _ string, req service.PullRequest) (wire.PullPage, error) {
		reqs <- req
		return wire.PullPage{Changes: []wire.Change{}}, nil
	}}
	s := newServer(t, f, Config{})
	if a := call(t, s, "GET", "/sync/v1/pull?cursor=", edgeToken, nil); a.status != 200 {
		t.Fatalf("status %d", a.status)
	}
	if r := <-reqs; r.Have != nil || r.Wait != 0 {
		t.Fatalf("older edge's pull: %+v", r)
	}
	if a := call(t, s, "GET", "/sync/v1/pull?have=dir", edgeToken, nil); a.status != 400 {
		t.Fatalf("malformed have: status %d, want 400", a.status)
	}
}
