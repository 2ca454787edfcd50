package syncer

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/pkg/backoff"
	"github.com/outpost-edge/outpost/pkg/cloud/client"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// TestThrottleObeysRetryAfter: a 429 from the cloud becomes a wait of at
// least its Retry-After (plus at most a quarter of jitter), not the
// exponential backoff used for failures, and does not count as a lost link.
func TestThrottleObeysRetryAfter(t *testing.T) {
	// The cloud's admission control answers 429 with Retry-After.
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(wire.HeaderRetryAfter, "3")
		w.WriteHeader(http.StatusTooManyRequests)
		_, _ = w.Write([]byte(`{"code":429,"message":"busy","data":null}`))
	}))
	defer srv.Close()
	cl, err := client.New([]string{srv.URL}, "tok")
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, pushErr := cl.Push(ctx, &wire.PushBatch{Edge: "e1", FirstSeq: 1})
	var th *client.ThrottledError
	if !errors.As(pushErr, &th) || th.RetryAfter != 3*time.Second {
		t.Fatalf("push error %v, want a ThrottledError of 3s", pushErr)
	}

	st, err := store.Open(filepath.Join(t.TempDir(), "edge.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	s, err := New(Config{EdgeID: "e1"}, Deps{Store: st, Client: cl})
	if err != nil {
		t.Fatal(err)
	}
	s.connected.Store(true)
	bo := &backoff.Backoff{Base: 100 * time.Millisecond, Max: 200 * time.Millisecond}
	for i := 0; i < 20; i++ {
		if d := s.failed("push", pushErr, bo); d < 3*time.Second || d > 3*time.Second+750*time.Millisecond {
			t.Fatalf("throttled wait %s, want Retry-After 3s plus at most 25%% jitter", d)
		}
	}
	if !s.connected.Load() {
		t.Fatal("a throttled exchange marked the link as down")
	}
	// A long Retry-After is the cloud's estimate of this edge's own turn
	// (it spreads the edges it refuses): jitter of at most a second, not a
	// quarter of it, so the edges told the latest turns are not later still.
	for i := 0; i < 20; i++ {
		if d := ThrottleWait(20 * time.Second); d < 20*time.Second || d > 21*time.Second {
			t.Fatalf("throttled wait %s for Retry-After 20s, want 20s plus at most 1s of jitter", d)
		}
	}
	// A plain failure backs off exponentially within the cap instead.
	if d := s.failed("push", errors.New("connection refused"), bo); d > 200*time.Millisecond {
		t.Fatalf("failure wait %s beyond the backoff cap", d)
	}
}
