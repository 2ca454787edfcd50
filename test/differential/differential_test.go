package differential

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/shadow"
	"github.com/outpost-edge/outpost/pkg/store"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// The test plays one edge ("e") against the cloud. Writes come from three
// origins: local writes at e (desired, meta, users through the store's write
// paths, reported through Ingest), writes made in the cloud's own API, and
// writes made at another edge ("f"). Stamps are drawn from a tiny space (two
// milliseconds, two counters) so that writes from different origins collide
// on purpose. The edge sees its own writes and, in a random interleaving,
// everything else through ApplyRemote (as pulls deliver it); the cloud sees
// everything in another random order, e's changes both ahead of the
// sequence (CmdState) and in the sequenced push. Both must end in the same
// canonical state.

const (
	cases  = 300
	baseMs = 1_700_000_000_000
)

var (
	devices = []string{"d1", "d2"}
	users   = []string{"u1", "u2"}
	fields  = []string{"f1", "f2"}
	values  = []string{`1`, `2`, `"a"`, `"<b>"`, `{"k":1}`, `[1,2]`, `null`}
	regions = []string{"", "north", "south"}
	owners  = [][]string{nil, {"alice"}, {"bob"}, {"alice", "bob"}}
	tagSets = []map[string]string{nil, {"a": "z"}, {"a-": "0"}, {"a": "z", "b": "1"}, {"x": ""}}
	roles   = [][]string{{"viewer"}, {"admin"}, {"viewer", "operator"}}
	uRegion = [][]string{nil, {"north"}, {"north", "south"}}
)

// write is one generated change. Local writes have no stamp: e's clock
// assigns it, at wall time wallMs.
type write struct {
	local  bool
	origin string // "" for the cloud's API, "f" for the other edge
	wallMs int64  // local writes: e's wall clock at the write
	change wire.Change
}

func randStamp(r *rand.Rand) hlc.Timestamp {
	return hlc.New(baseMs+int64(r.IntN(2)), uint16(r.IntN(2)))
}

func randDoc(r *rand.Rand, stamp hlc.Timestamp) shadow.Doc {
	patch := map[string]json.RawMessage{}
	for _, f := range fields {
		if r.IntN(2) == 0 {
			patch[f] = json.RawMessage(values[r.IntN(len(values))])
		}
	}
	if len(patch) == 0 {
		patch[fields[r.IntN(len(fields))]] = json.RawMessage(values[r.IntN(len(values))])
	}
	return shadow.Patch(patch, stamp)
}

func randMeta(r *rand.Rand, stamp hlc.Timestamp) *wire.Meta {
	return &wire.Meta{Owners: owners[r.IntN(len(owners))], Region: regions[r.IntN(len(regions))],
		Tags: tagSets[r.IntN(len(tagSets))], Stamp: stamp}
}

func randUser(r *rand.Rand, stamp hlc.Timestamp) *wire.User {
	return &wire.User{OpenID: users[r.IntN(len(users))], Roles: roles[r.IntN(len(roles))],
		Regions: uRegion[r.IntN(len(uRegion))], Stamp: stamp}
}

func generate(r *rand.Rand) []write {
	n := 6 + r.IntN(14)
	out := make([]write, 0, n)
	kinds := []string{wire.KindDesired, wire.KindReported, wire.KindMeta, wire.KindUser}
	for range n {
		w := write{}
		switch r.IntN(3) {
		case 0:
			w.local, w.origin = true, "e"
			w.wallMs = baseMs + int64(r.IntN(2))
		case 1:
			w.origin = ""
		case 2:
			w.origin = "f"
		}
		kind := kinds[r.IntN(len(kinds))]
		if w.origin == "" && kind == wire.KindReported {
			kind = wire.KindDesired // the cloud's API writes no reported state
		}
		stamp := randStamp(r)
		c := wire.Change{Kind: kind, Device: devices[r.IntN(len(devices))]}
		switch kind {
		case wire.KindDesired, wire.KindReported:
			c.Doc = randDoc(r, stamp)
		case wire.KindMeta:
			c.Meta = randMeta(r, stamp)
		case wire.KindUser:
			c.Device = ""
			c.User = randUser(r, stamp)
		}
		w.change = c
		out = append(out, w)
	}
	return out
}

// edge applies the writes to a real edge store in the given order and
// returns it with its outbox (e's own changes, stamped by its clock).
func runEdge(t *testing.T, ws []write) (*store.Store, []store.Change) {
	t.Helper()
	var wall int64 = baseMs
	clock := hlc.NewClock(func() time.Time { return time.UnixMilli(wall) }, 0)
	s, err := store.Open(filepath.Join(t.TempDir(), "edge.db"), store.Options{EdgeID: "e", Clock: clock, NoSync: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	for _, w := range ws {
		c := w.change
		if !w.local {
			c = viaJSON(t, c) // as a pull page delivers it
			sc, ok := edgeChange(&c)
			if !ok {
				t.Fatalf("unconvertible change %+v", c)
			}
			if _, err := s.ApplyRemote([]store.Change{sc}); err != nil {
				t.Fatal(err)
			}
			continue
		}
		wall = w.wallMs
		switch c.Kind {
		case wire.KindDesired:
			_, err = s.SetDesired(c.Device, docPatch(c.Doc))
		case wire.KindReported:
			_, err = s.Ingest([]store.Item{{Device: c.Device, ReceivedAt: wall, State: docPatch(c.Doc)}}, nil)
		case wire.KindMeta:
			_, err = s.SetMeta(c.Device, store.DeviceMeta{Owners: c.Meta.Owners, Region: c.Meta.Region, Tags: c.Meta.Tags})
		case wire.KindUser:
			err = s.PutUser(store.User{OpenID: c.User.OpenID, Roles: c.User.Roles, Regions: c.User.Regions})
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	out, err := s.Outbox(0, 1<<20, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	return s, out
}

// docPatch turns a generated delta back into the field values a client
// would send (tombstones as null).
func docPatch(d shadow.Doc) map[string]json.RawMessage {
	p := map[string]json.RawMessage{}
	for k, f := range d {
		if f.Deleted {
			p[k] = json.RawMessage(`null`)
		} else {
			p[k] = f.Value
		}
	}
	return p
}

func runCloud(t *testing.T, r *rand.Rand, ws []write, outbox []store.Change) *fsm.FSM {
	t.Helper()
	f, err := fsm.Open(filepath.Join(t.TempDir(), "state.db"), slog.New(slog.NewTextHandler(io.Discard, nil)), fsm.Hooks{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close() })
	var cmds []*fsm.Command
	for _, w := range ws {
		if w.local {
			continue
		}
		c := w.change
		switch {
		case w.origin == "f":
			cmds = append(cmds, &fsm.Command{Type: fsm.CmdState, AtMs: baseMs, State: &wire.StateBatch{Edge: "f", Changes: []wire.Change{c}}})
		case c.Kind == wire.KindUser:
			cmds = append(cmds, &fsm.Command{Type: fsm.CmdUserPut, AtMs: baseMs, User: c.User})
		case c.Kind == wire.KindMeta:
			cmds = append(cmds, &fsm.Command{Type: fsm.CmdMeta, AtMs: baseMs, Change: &c})
		default:
			cmds = append(cmds, &fsm.Command{Type: fsm.CmdDesired, AtMs: baseMs, Change: &c})
		}
	}
	// e's changes arrive ahead of the sequence in any order (state before
	// history), and again in the sequenced push at the end.
	var push []wire.Change
	for i := range outbox {
		wc := wireChange(&outbox[i])
		push = append(push, wc)
		cmds = append(cmds, &fsm.Command{Type: fsm.CmdState, AtMs: baseMs, State: &wire.StateBatch{Edge: "e", Changes: []wire.Change{wc}}})
	}
	r.Shuffle(len(cmds), func(i, j int) { cmds[i], cmds[j] = cmds[j], cmds[i] })
	if len(push) > 0 {
		cmds = append(cmds, &fsm.Command{Type: fsm.CmdPush, AtMs: baseMs, Push: &wire.PushBatch{Edge: "e", FirstSeq: outbox[0].Seq, Changes: push}})
	}
	for i, c := range cmds {
		b, err := fsm.EncodeCommand(c)
		if err != nil {
			t.Fatal(err)
		}
		res, _ := f.Apply(&raft.Log{Index: uint64(i + 1), Type: raft.LogCommand, Data: fsm.EncodeEntry([][]byte{b})}).([]fsm.Result)
		if len(res) != 1 || res[0].Err != nil {
			t.Fatalf("apply %+v: %+v", c, res)
		}
	}
	return f
}

// ---- canonical dump ----

type fieldDump struct {
	Value   string `json:"v,omitempty"`
	Stamp   string `json:"t"`
	Deleted bool   `json:"d,omitempty"`
}

type deviceDump struct {
	Reported map[string]fieldDump `json:"reported"`
	Desired  map[string]fieldDump `json:"desired"`
	Owners   []string             `json:"owners"`
	Region   string               `json:"region"`
	Tags     map[string]string    `json:"tags"`
	Stamp    string               `json:"meta_stamp"`
}

type userDump struct {
	Roles   []string `json:"roles"`
	Regions []string `json:"regions"`
	Stamp   string   `json:"stamp"`
}

type dump struct {
	Devices map[string]deviceDump `json:"devices"`
	Users   map[string]userDump   `json:"users"`
}

// canonValue renders a JSON value in one form whatever its spelling (the
// edge and the cloud may store different escapes of the same string).
func canonValue(t *testing.T, v json.RawMessage) string {
	t.Helper()
	var x any
	d := json.NewDecoder(bytes.NewReader(v))
	d.UseNumber()
	if err := d.Decode(&x); err != nil {
		t.Fatalf("stored value %q: %v", v, err)
	}
	b, err := json.Marshal(x)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func docDump(t *testing.T, d shadow.Doc) map[string]fieldDump {
	out := map[string]fieldDump{}
	for k, f := range d {
		fd := fieldDump{Stamp: f.Stamp.String(), Deleted: f.Deleted}
		if !f.Deleted {
			fd.Value = canonValue(t, f.Value)
		}
		out[k] = fd
	}
	return out
}

func nz(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

func nzm(m map[string]string) map[string]string {
	if m == nil {
		return map[string]string{}
	}
	return m
}

func encode(t *testing.T, d dump) string {
	t.Helper()
	b, err := json.MarshalIndent(d, "", " ")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func edgeDump(t *testing.T, s *store.Store) string {
	d := dump{Devices: map[string]deviceDump{}, Users: map[string]userDump{}}
	for _, id := range devices {
		dev, err := s.Device(id)
		if err != nil {
			continue
		}
		d.Devices[id] = deviceDump{Reported: docDump(t, dev.Reported), Desired: docDump(t, dev.Desired),
			Owners: nz(dev.Meta.Owners), Region: dev.Meta.Region, Tags: nzm(dev.Meta.Tags), Stamp: dev.Meta.Stamp.String()}
	}
	for _, id := range users {
		u, err := s.User(id)
		if err != nil {
			continue
		}
		d.Users[id] = userDump{Roles: nz(u.Roles), Regions: nz(u.Regions), Stamp: u.Stamp.String()}
	}
	return encode(t, d)
}

func cloudDump(t *testing.T, f *fsm.FSM) string {
	d := dump{Devices: map[string]deviceDump{}, Users: map[string]userDump{}}
	for _, id := range devices {
		dev, err := f.GetDevice(id)
		if err != nil {
			continue
		}
		d.Devices[id] = deviceDump{Reported: docDump(t, dev.Reported), Desired: docDump(t, dev.Desired),
			Owners: nz(dev.Owners), Region: dev.Region, Tags: nzm(dev.Tags), Stamp: dev.MetaStamp.String()}
	}
	for _, id := range users {
		u, err := f.GetUser(id)
		if err != nil {
			continue
		}
		d.Users[id] = userDump{Roles: nz(u.Roles), Regions: nz(u.Regions), Stamp: u.Stamp.String()}
	}
	return encode(t, d)
}

func TestEdgeAndCloudConverge(t *testing.T) {
	for seed := uint64(1); seed <= cases; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			r := rand.New(rand.NewPCG(seed, 10))
			ws := generate(r)
			edgeOrder := append([]write(nil), ws...)
			r.Shuffle(len(edgeOrder), func(i, j int) { edgeOrder[i], edgeOrder[j] = edgeOrder[j], edgeOrder[i] })
			s, outbox := runEdge(t, edgeOrder)
			f := runCloud(t, r, ws, outbox)
			if e, c := edgeDump(t, s), cloudDump(t, f); e != c {
				t.Fatalf("seed %d: edge and cloud differ\n%s\nwrites:\n%s", seed, diff(e, c), describe(edgeOrder))
			}
		})
	}
}

func describe(ws []write) string {
	var b strings.Builder
	for _, w := range ws {
		j, _ := json.Marshal(w.change)
		switch {
		case w.local:
			fmt.Fprintf(&b, "  e local at wall %d (stamped by e's clock) %s\n", w.wallMs, j)
		case w.origin == "":
			fmt.Fprintf(&b, "  cloud %s\n", j)
		default:
			fmt.Fprintf(&b, "  %s %s\n", w.origin, j)
		}
	}
	return b.String()
}

// diff shows the lines of the two dumps that differ.
func diff(edge, cloud string) string {
	el, cl := strings.Split(edge, "\n"), strings.Split(cloud, "\n")
	var b strings.Builder
	for i := 0; i < max(len(el), len(cl)); i++ {
		var e, c string
		if i < len(el) {
			e = el[i]
		}
		if i < len(cl) {
			c = cl[i]
		}
		if e != c {
			fmt.Fprintf(&b, "  line %d: edge %s | cloud %s\n", i+1, strings.TrimSpace(e), strings.TrimSpace(c))
		}
	}
	return b.String()
}

// ---- conversions as the syncer makes them ----

// viaJSON sends a change through its wire encoding.
func viaJSON(t *testing.T, c wire.Change) wire.Change {
	t.Helper()
	b, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	var out wire.Change
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatalf("decode %s: %v", b, err)
	}
	return out
}

func wireChange(c *store.Change) wire.Change {
	w := wire.Change{Kind: c.Kind.String(), Device: c.Device}
	switch c.Kind {
	case store.ChangeReported, store.ChangeDesired:
		w.Doc = c.Doc
	case store.ChangeMeta:
		w.Meta = &wire.Meta{Owners: c.Meta.Owners, Region: c.Meta.Region, Tags: c.Meta.Tags, Stamp: c.Meta.Stamp}
	case store.ChangeUser:
		w.Device = ""
		w.User = &wire.User{OpenID: c.User.OpenID, Roles: c.User.Roles, Regions: c.User.Regions, Stamp: c.User.Stamp}
	}
	return w
}

func edgeChange(w *wire.Change) (store.Change, bool) {
	c := store.Change{Device: w.Device}
	switch w.Kind {
	case wire.KindDesired:
		c.Kind, c.Doc = store.ChangeDesired, w.Doc
	case wire.KindReported:
		c.Kind, c.Doc = store.ChangeReported, w.Doc
	case wire.KindMeta:
		c.Kind = store.ChangeMeta
		c.Meta = &store.DeviceMeta{Owners: w.Meta.Owners, Region: w.Meta.Region, Tags: w.Meta.Tags, Stamp: w.Meta.Stamp}
	case wire.KindUser:
		c.Kind, c.Device = store.ChangeUser, w.User.OpenID
		c.User = &store.User{OpenID: w.User.OpenID, Roles: w.User.Roles, Regions: w.User.Regions, Stamp: w.User.Stamp}
	default:
		return c, false
	}
	return c, true
}
