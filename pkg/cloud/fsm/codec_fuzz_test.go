package fsm

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/hashicorp/raft"

	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/shadow"
	"github.com/outpost-edge/outpost/pkg/wire"
)

var writeSeeds = flag.Bool("write-seeds", false, "rewrite testdata/fuzz/FuzzDecodeEntry from seedEntries")

// seedEntries are raft entries as the leader writes them, one per command
// type and a group-committed one; they seed FuzzDecodeEntry.
func seedEntries(t testing.TB) map[string][]byte {
	t.Helper()
	loc := &wire.Location{Lat: 52.5, Lng: 13.4}
	doc := shadow.Doc{"fw": {Value: json.RawMessage(`"1.2"`), Stamp: hlc.Timestamp(1 << 20)},
		"gone": {Stamp: hlc.Timestamp(1<<20 + 1), Deleted: true}}
	readings := wire.Change{Kind: wire.KindReadings, Device: "d1", Readings: []wire.Reading{
		{TS: 1732170000123, ID: "m-1", Metrics: map[string]float64{"temp": 21.5, "hum": 40}},
		{TS: -1, Metrics: map[string]float64{"nan": math.NaN(), "inf": math.Inf(-1)}},
		{TS: 1732170000124, Metrics: map[string]float64{}},
	}}
	meta := wire.Change{Kind: wire.KindMeta, Device: "d1", Meta: &wire.Meta{Owners: []string{"o1"}, Region: "eu", Tags: wire.Tags{"a": "z"}, Stamp: 7}}
	user := wire.Change{Kind: wire.KindUser, Device: "u1", User: &wire.User{OpenID: "u1", Roles: []string{"admin"}, Stamp: 9}}
	cmds := map[string]*Command{
		"push":          {Type: CmdPush, AtMs: 1000, Push: &wire.PushBatch{Edge: "e1", FirstSeq: 1, Changes: []wire.Change{readings, {Kind: wire.KindReported, Device: "d1", Doc: doc}, meta, user}}},
		"push-empty":    {Type: CmdPush, AtMs: 1, Push: &wire.PushBatch{Edge: "e1", FirstSeq: 5}},
		"desired":       {Type: CmdDesired, AtMs: 2000, Change: &wire.Change{Kind: wire.KindDesired, Device: "d1", Doc: doc}},
		"meta":          {Type: CmdMeta, AtMs: 2001, Change: &meta},
		"heartbeat":     {Type: CmdHeartbeat, AtMs: 3000, Heartbeat: &wire.Heartbeat{Edge: "e1", Region: "eu", Location: loc, Advertise: "http://e1:8080", Backlog: 3, OldestUnsyncedMs: 99}},
		"node-upsert":   {Type: CmdNodeUpsert, AtMs: 4000, Node: &Node{ID: "n1", RaftAddr: "127.0.0.1:7000", HTTPAddr: "127.0.0.1:8000"}},
		"node-remove":   {Type: CmdNodeRemove, AtMs: 4001, NodeID: "n1"},
		"user-put":      {Type: CmdUserPut, AtMs: 5000, User: user.User},
		"state":         {Type: CmdState, AtMs: 6000, State: &wire.StateBatch{Edge: "e1", Changes: []wire.Change{{Kind: wire.KindReported, Device: "d2", Doc: doc}, meta}}},
		"policy-put":    {Type: CmdPolicyPut, AtMs: 7000, Policy: &wire.Policy{Name: "authz", Rego: "package authz\n"}},
		"signing-key":   {Type: CmdSigningKey, AtMs: 8000, Key: &SigningKey{KID: "k1", Seed: bytes.Repeat([]byte{7}, 32)}},
		"session-new":   {Type: CmdSessionCreate, AtMs: 9000, Session: &SessionCmd{Family: "f1", OpenID: "u1", To: "t1", ExpMs: 99999}},
		"session-rot":   {Type: CmdSessionRotate, AtMs: 9001, Session: &SessionCmd{Family: "f1", From: "t1", To: "t2", ExpMs: 99999}},
		"session-rev":   {Type: CmdSessionRevokeUser, AtMs: 9002, Session: &SessionCmd{OpenID: "u1", BeforeMs: 9002, UntilMs: 99999}},
		"session-purge": {Type: CmdSessionPurge, AtMs: 9003, Session: &SessionCmd{}},
		"sink-cursor":   {Type: CmdSinkCursor, AtMs: 9100, Sink: &SinkCursorCmd{Sink: "js", Index: 42}},
		"alerts":        {Type: CmdAlerts, AtMs: 9300, Alerts: &AlertsCmd{Edge: "e1", Alerts: []rules.Alert{{ID: "d1~hot~5", Rule: "hot", Device: "d1", State: rules.StateActive, StartedAt: 5, Stamp: hlc.New(5, 0)}}}},
		"notify-done":   {Type: CmdNotifyDone, AtMs: 9400, Notify: &NotifyDoneCmd{ID: "d1~hot~5", Owner: "o-1"}},
		"rule-put":      {Type: CmdRulePut, AtMs: 9200, Rule: &RuleCmd{Name: "hot", Region: "eu", Rule: json.RawMessage(`{"name":"hot","when":"temp > 30"}`)}},
	}
	out := make(map[string][]byte, len(cmds)+1)
	var all [][]byte
	for _, name := range slices.Sorted(maps.Keys(cmds)) {
		b, err := EncodeCommand(cmds[name])
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		out[name] = EncodeEntry([][]byte{b})
		all = append(all, b)
	}
	out["group"] = EncodeEntry(all)
	return out
}

// TestWriteFuzzSeeds rewrites the checked-in seed corpus when run with
// -write-seeds (after a change to the encoding); otherwise it checks that
// every seed is still there, so the corpus cannot silently go stale.
func TestWriteFuzzSeeds(t *testing.T) {
	dir := filepath.Join("testdata", "fuzz", "FuzzDecodeEntry")
	for name, b := range seedEntries(t) {
		path := filepath.Join(dir, "seed-"+name)
		want := fmt.Appendf(nil, "go test fuzz v1\n[]byte(%q)\n", b)
		if *writeSeeds {
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(path, want, 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("%v (run go test -run TestWriteFuzzSeeds -write-seeds)", err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s differs from what the encoder writes today (run go test -run TestWriteFuzzSeeds -write-seeds)", path)
		}
	}
}

// FuzzDecodeEntry feeds arbitrary raft entries to the decoder every replica
// runs. Decoding must never panic, and whatever decodes must be a command
// the encoder can write again: encoding it and decoding the result gives the
// same command, and a second round is byte-identical.
func FuzzDecodeEntry(f *testing.F) {
	for _, b := range seedEntries(f) {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		cmds, err := splitEntry(data)
		if err != nil {
			return
		}
		for _, raw := range cmds {
			d, err := decodeCommand(raw)
			if err != nil {
				continue
			}
			b1 := mustEncode(t, d)
			d2, err := decodeCommand(b1)
			if err != nil {
				t.Fatalf("re-encoded command does not decode: %v\ninput %q\nencoded %q", err, raw, b1)
			}
			if a, b := canonical(t, d), canonical(t, d2); a != b {
				t.Fatalf("round trip changed the command:\nbefore %s\nafter  %s", a, b)
			}
			if b2 := mustEncode(t, d2); !bytes.Equal(b1, b2) {
				t.Fatalf("encoding is not stable:\n%q\n%q", b1, b2)
			}
		}
	})
}

// mustEncode writes a decoded command back through EncodeCommand.
func mustEncode(t *testing.T, d *decodedCmd) []byte {
	t.Helper()
	c := d.Cmd
	switch d.Type {
	case CmdPush:
		c.Push = &wire.PushBatch{Edge: d.Edge, FirstSeq: d.FirstSeq, Changes: wireChanges(t, d.Changes)}
	case CmdState:
		c.State = &wire.StateBatch{Edge: d.Edge, Changes: wireChanges(t, d.Changes)}
	}
	b, err := EncodeCommand(&c)
	if err != nil {
		t.Fatalf("decoded command does not encode: %v", err)
	}
	return b
}

func wireChanges(t *testing.T, rcs []rawChange) []wire.Change {
	t.Helper()
	out := make([]wire.Change, 0, len(rcs))
	for _, rc := range rcs {
		if rc.Other != nil {
			out = append(out, *rc.Other)
			continue
		}
		c := wire.Change{Kind: rc.Kind, Device: rc.Device, Readings: make([]wire.Reading, 0, len(rc.Readings))}
		for _, rr := range rc.Readings {
			m, err := DecodeMetrics(rr.Metrics)
			if err != nil {
				t.Fatalf("decoded reading's metrics %q do not decode: %v", rr.Metrics, err)
			}
			c.Readings = append(c.Readings, wire.Reading{TS: rr.TS, ID: rr.ID, Metrics: m})
		}
		out = append(out, c)
	}
	return out
}

// canonical renders a decoded command for comparison: JSON payloads
// re-marshalled (which compacts raw values) and metrics by their bits, so
// NaN compares equal to itself.
func canonical(t *testing.T, d *decodedCmd) string {
	t.Helper()
	type reading struct {
		TS      int64
		ID      string
		Metrics map[string]uint64
	}
	type change struct {
		Kind, Device string
		Readings     []reading
		Other        *wire.Change
	}
	v := struct {
		Type     CmdType
		AtMs     int64
		Edge     string
		FirstSeq uint64
		Changes  []change
		Cmd      Command
	}{Type: d.Type, AtMs: d.AtMs, Edge: d.Edge, FirstSeq: d.FirstSeq, Cmd: d.Cmd}
	for _, rc := range d.Changes {
		c := change{Kind: rc.Kind, Device: rc.Device, Other: rc.Other}
		for _, rr := range rc.Readings {
			m, err := DecodeMetrics(rr.Metrics)
			if err != nil {
				t.Fatalf("decoded reading's metrics %q do not decode: %v", rr.Metrics, err)
			}
			bits := make(map[string]uint64, len(m))
			for k, x := range m {
				bits[k] = math.Float64bits(x)
			}
			c.Readings = append(c.Readings, reading{TS: rr.TS, ID: rr.ID, Metrics: bits})
		}
		v.Changes = append(v.Changes, c)
	}
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("marshal decoded command: %v", err)
	}
	return string(b)
}

// FuzzApplyEntry applies arbitrary raft entries to a state machine:
// whatever a leader could have written (corrupt, or well-formed but
// nonsensical, like a meta change without meta), Apply must not panic, since
// every replica would panic at the same index and again after each restart.
// Two replicas fed the same entries must give the same results. The replicas
// live as long as the fuzz worker (opening bbolt per input is too slow to
// fuzz), so state built by earlier inputs is part of what is tested.
func FuzzApplyEntry(f *testing.F) {
	for _, b := range seedEntries(f) {
		f.Add(b)
	}
	var replicas [2]*FSM
	for i := range replicas {
		dir, err := os.MkdirTemp("", "fuzz-apply-")
		if err != nil {
			f.Fatal(err)
		}
		fsm, err := Open(filepath.Join(dir, "state.db"), slog.New(slog.NewTextHandler(io.Discard, nil)), Hooks{})
		if err != nil {
			f.Fatal(err)
		}
		replicas[i] = fsm
		f.Cleanup(func() { _ = fsm.Close(); _ = os.RemoveAll(dir) })
	}
	var index uint64
	f.Fuzz(func(t *testing.T, data []byte) {
		index++
		var got [2]string
		for i, fsm := range replicas {
			res, _ := fsm.Apply(&raft.Log{Index: index, Type: raft.LogCommand, Data: data}).([]Result)
			for _, r := range res {
				dev, _ := json.Marshal(r.Device)
				got[i] += fmt.Sprintf("%v %d %d %d %d %s\n", r.Err, r.Expected, r.AckedSeq, r.Applied, r.Duplicates, dev)
			}
		}
		if got[0] != got[1] {
			t.Fatalf("replicas differ:\n%s\n%s", got[0], got[1])
		}
	})
}
