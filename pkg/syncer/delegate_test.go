package syncer

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"path/filepath"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/pkg/cloud/client"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/policy"
	"github.com/outpost-edge/outpost/pkg/shadow"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/wire"
)

func openStore(t *testing.T) *store.Store {
	t.Helper()
	st, err := store.Open(filepath.Join(t.TempDir(), "edge.db"), store.Options{EdgeID: "e1"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

// ackingCloud acknowledges every push and state batch it receives.
func ackingCloud(t *testing.T) *client.Client {
	t.Helper()
	return fakeCloud(t, func(w http.ResponseWriter, r *http.Request) {
		var data any
		switch r.URL.Path {
		case wire.PathPush:
			var b wire.PushBatch
			if err := json.NewDecoder(r.Body).Decode(&b); err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			data = wire.PushResult{AckedSeq: b.LastSeq(), Applied: len(b.Changes)}
		case wire.PathState:
			data = wire.StateResult{}
		case wire.PathHeartbeat:
			data = wire.HeartbeatResult{ServerTimeMs: time.Now().UnixMilli()}
		default:
			http.NotFound(w, r)
			return
		}
		answer(w, data)
	})
}

// Config.AfterAck runs for each acknowledged push, with the cloud's
// acknowledged sequence, before the outbox records the acknowledgement: the
// window a crash test kills the process in.
func TestAfterAckRunsBeforeTheAckIsRecorded(t *testing.T) {
	st := openStore(t)
	for _, d := range []string{"d1", "d2", "d3"} {
		if _, err := st.SetDesired(d, map[string]json.RawMessage{"mode": json.RawMessage(`"eco"`)}); err != nil {
			t.Fatal(err)
		}
	}
	head := st.Counts().OutboxHead
	type call struct{ seq, recorded uint64 }
	var mu sync.Mutex
	var calls []call
	s, err := New(Config{EdgeID: "e1", BatchReadings: 1, AfterAck: func(seq uint64) {
		mu.Lock()
		defer mu.Unlock()
		calls = append(calls, call{seq, st.Counts().OutboxAcked})
	}}, Deps{Store: st, Client: ackingCloud(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.resume(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := s.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(calls) == 0 || calls[len(calls)-1].seq != head {
		t.Fatalf("AfterAck calls %+v, want the last at the outbox head %d", calls, head)
	}
	for _, c := range calls {
		if c.recorded >= c.seq {
			t.Fatalf("AfterAck(%d) ran after the outbox recorded %d", c.seq, c.recorded)
		}
	}
	if got := st.Counts().OutboxAcked; got != head {
		t.Fatalf("outbox acked %d after Flush, want %d", got, head)
	}
}

// fakePolicies records installations and answers with err.
type fakePolicies struct {
	installs [][]policy.Module
	err      error
}

func (f *fakePolicies) Install(_ context.Context, ms []policy.Module) error {
	f.installs = append(f.installs, ms)
	return f.err
}

// Pulled policies are handed to the policy engine once per distinct set: a
// set it rejects is remembered (reinstalling cannot help), a failed write is
// not (the next pull retries it).
func TestPulledPoliciesAreInstalled(t *testing.T) {
	page := &wire.PullPage{Policies: []wire.Policy{{Name: "b.rego", Rego: "package b"}, {Name: "a.rego", Rego: "package a"}}}
	want := []policy.Module{{Name: "a.rego", Source: "package a"}, {Name: "b.rego", Source: "package b"}}
	tests := []struct {
		name         string
		err          error
		wantErr      bool
		wantInstalls int // after applying the page twice
	}{
		{"installed", nil, false, 1},
		{"rejected by the engine", policy.ErrRejected, false, 1},
		{"write failed", errors.New("disk full"), true, 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fp := &fakePolicies{err: tt.err}
			s, err := New(Config{EdgeID: "e1"}, Deps{Store: openStore(t), Client: ackingCloud(t), Policies: fp})
			if err != nil {
				t.Fatal(err)
			}
			for range 2 {
				if err := s.applySets(t.Context(), page); (err != nil) != tt.wantErr {
					t.Fatalf("applySets: %v, want error %v", err, tt.wantErr)
				}
			}
			if len(fp.installs) != tt.wantInstalls {
				t.Fatalf("%d installs, want %d", len(fp.installs), tt.wantInstalls)
			}
			if !reflect.DeepEqual(fp.installs[0], want) {
				t.Fatalf("installed %+v, want %+v", fp.installs[0], want)
			}
		})
	}
}

// fakeDownlink records publications.
type fakeDownlink struct {
	mu   sync.Mutex
	msgs []published
}

type published struct {
	topic   string
	payload string
	retain  bool
	qos     byte
}

func (f *fakeDownlink) Publish(topic string, payload []byte, retain bool, qos byte) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.msgs = append(f.msgs, published{topic, string(payload), retain, qos})
	return nil
}

// Desired state pulled from the cloud goes to the device as the wire
// downlink: retained, QoS 1, the whole desired document.
func TestPulledDesiredIsPublished(t *testing.T) {
	st := openStore(t)
	dl := &fakeDownlink{}
	s, err := New(Config{EdgeID: "e1"}, Deps{Store: st, Client: ackingCloud(t), Downlink: dl})
	if err != nil {
		t.Fatal(err)
	}
	stamp := hlc.New(time.Now().UnixMilli(), 0)
	doc := shadow.Doc{"mode": {Value: json.RawMessage(`"eco"`), Stamp: stamp}}
	if err := s.apply([]wire.Change{{Kind: wire.KindDesired, Device: "d1", Doc: doc}}); err != nil {
		t.Fatal(err)
	}
	payload, err := wire.DesiredPayload(doc)
	if err != nil {
		t.Fatal(err)
	}
	want := []published{{wire.DesiredTopic("d1"), string(payload), true, wire.DesiredQoS}}
	if !reflect.DeepEqual(dl.msgs, want) {
		t.Fatalf("published %+v, want %+v", dl.msgs, want)
	}
	// The same change again is no change: nothing is republished.
	if err := s.apply([]wire.Change{{Kind: wire.KindDesired, Device: "d1", Doc: doc}}); err != nil {
		t.Fatal(err)
	}
	if len(dl.msgs) != 1 {
		t.Fatalf("an unchanged desired state was republished: %+v", dl.msgs)
	}
}
