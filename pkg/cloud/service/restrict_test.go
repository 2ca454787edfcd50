package service

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/daemontest"
	uauth "github.com/outpost-edge/outpost/pkg/auth"
	"github.com/outpost-edge/outpost/pkg/hlc"
	"github.com/outpost-edge/outpost/pkg/rules"
	"github.com/outpost-edge/outpost/pkg/shadow"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// restrictedCloud is a one-node cloud with dev login, "admin" an admin,
// "op" an operator of region north and "viewer" a viewer, and device d1
// homed at edge eA in region north.
func restrictedCloud(t *testing.T, cfg Config) *node {
	t.Helper()
	cfg.DevLogin, cfg.Admins = true, []string{"admin"}
	n := startService(t, cfg)
	ctx := context.Background()
	if _, err := n.svc.PutUser(ctx, wire.User{OpenID: "op", Roles: []string{"operator"}, Regions: []string{"north"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := n.svc.PutUser(ctx, wire.User{OpenID: "viewer", Roles: []string{"viewer"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := n.svc.State(ctx, "eA", &wire.StateBatch{Changes: []wire.Change{{Kind: wire.KindReported, Device: "d1",
		Doc: shadow.Doc{"fw": {Value: []byte(`"1.0"`), Stamp: n.clock.Now()}}}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := n.svc.PutMeta(ctx, "d1", wire.Meta{Region: "north", Owners: []string{"viewer"}}); err != nil {
		t.Fatal(err)
	}
	return n
}

// token logs openid in at the cloud: an access token signed by the
// deployment key.
func (n *node) token(t *testing.T, openid string) string {
	t.Helper()
	p, err := n.svc.Login(context.Background(), "dev:"+openid)
	if err != nil {
		t.Fatal(err)
	}
	return p.AccessToken
}

// edgeSigned is a token for openid signed by an edge's own key (a
// standalone edge's dev login), not the deployment's.
func edgeSigned(t *testing.T, openid string) string {
	t.Helper()
	seed := make([]byte, 32)
	_, _ = rand.Read(seed)
	ring, err := uauth.NewMemoryKeyring(seed, nil)
	if err != nil {
		t.Fatal(err)
	}
	p, _, err := uauth.NewIssuer(ring, uauth.IssuerConfig{Issuer: "eB"}).Issue(context.Background(), openid)
	if err != nil {
		t.Fatal(err)
	}
	return p.AccessToken
}

// pulled is every change queued for edge.
func (n *node) pulled(t *testing.T, edge string) []wire.Change {
	t.Helper()
	p, err := n.svc.Pull(context.Background(), edge, PullRequest{Limit: 1000})
	if err != nil {
		t.Fatal(err)
	}
	return p.Changes
}

func desired(field, value string, stamp hlc.Timestamp) shadow.Doc {
	return shadow.Doc{field: {Value: json.RawMessage(value), Stamp: stamp}}
}

// TestSecurityEdgeCannotGrantRoles: finding 2, an edge's sync token
// granted deployment-wide admin: a user change with roles ["admin"] pushed
// through /sync/v1/state or /sync/v1/push was applied and broadcast to every
// edge. Now it is refused, whatever proof it carries, counted, and never
// applied nor sent to another edge.
func TestSecurityEdgeCannotGrantRoles(t *testing.T) {
	n := restrictedCloud(t, Config{})
	ctx := context.Background()
	admin := n.token(t, "admin")
	grant := func() wire.Change {
		return wire.Change{Kind: wire.KindUser, User: &wire.User{OpenID: "mallory", Roles: []string{"admin"}, Stamp: n.clock.Now()},
			Actor: "admin", Proof: admin}
	}
	so, err := n.svc.State(ctx, "eB", &wire.StateBatch{Changes: []wire.Change{grant()}})
	if err != nil {
		t.Fatal(err)
	}
	po, err := n.svc.Push(ctx, "eB", &wire.PushBatch{Edge: "eB", FirstSeq: 1, Changes: []wire.Change{grant()}})
	if err != nil {
		t.Fatal(err)
	}
	if u, err := n.fsm.GetUser("mallory"); err == nil && len(u.Roles) > 0 {
		t.Fatalf("the cloud holds mallory with roles %v", u.Roles)
	}
	for _, edge := range []string{"eA", "eC"} {
		for _, c := range n.pulled(t, edge) {
			if c.User != nil && c.User.OpenID == "mallory" && len(c.User.Roles) > 0 {
				t.Fatalf("edge %s is sent mallory with roles %v", edge, c.User.Roles)
			}
		}
	}
	if so.Refused != 1 || so.RefusedReasons[RefuseUserChange] != 1 {
		t.Fatalf("state result %+v, want the user change refused", so.StateResult)
	}
	if po.Refused != 1 || po.AckedSeq != 1 {
		t.Fatalf("push result %+v, want the user change refused and its sequence consumed", po.PushResult)
	}
	if got := daemontest.Metric(t, n.reg, "outpost_cloud_changes_refused_total", "edge", "eB", "reason", RefuseUserChange); got != 2 {
		t.Fatalf("outpost_cloud_changes_refused_total{eB,user_change} = %v, want 2", got)
	}
	// The edge that sent it is told the cloud's record (no roles), newer
	// than its own, so its copy returns to the cloud's value.
	var corrected bool
	for _, c := range n.pulled(t, "eB") {
		if c.User != nil && c.User.OpenID == "mallory" && len(c.User.Roles) == 0 {
			corrected = true
		}
	}
	if !corrected {
		t.Fatal("edge eB got no correction for the refused user change")
	}
}

// TestSecurityEdgeCannotWriteAnotherEdgesDevice: finding 3, an edge token
// could write desired state and meta for a device homed at another edge,
// which the home edge then published as a retained downlink. Now such a
// change needs proof of a user the cloud's policy allows: without it (or
// with a token signed by an edge's own key, or a user without the right) it
// is refused, the home edge is never sent it, and the sending edge is sent
// the cloud's value back; with a valid operator token for the device's
// region it is accepted and reaches the home edge.
func TestSecurityEdgeCannotWriteAnotherEdgesDevice(t *testing.T) {
	n := restrictedCloud(t, Config{})
	ctx := context.Background()
	op, viewer := n.token(t, "op"), n.token(t, "viewer")
	refused := []struct {
		name   string
		change wire.Change
		reason string
	}{
		{"desired without proof", wire.Change{Kind: wire.KindDesired, Device: "d1", Doc: desired("valve", `"open"`, n.clock.Now())}, RefuseNoProof},
		{"meta without proof", wire.Change{Kind: wire.KindMeta, Device: "d1", Meta: &wire.Meta{Region: "south", Owners: []string{"mallory"}, Stamp: n.clock.Now()}}, RefuseNoProof},
		{"desired with an edge-signed token", wire.Change{Kind: wire.KindDesired, Device: "d1", Doc: desired("valve", `"open"`, n.clock.Now()),
			Actor: "admin", Proof: edgeSigned(t, "admin")}, RefuseUntrustedKey},
		{"desired as a viewer", wire.Change{Kind: wire.KindDesired, Device: "d1", Doc: desired("valve", `"open"`, n.clock.Now()),
			Actor: "viewer", Proof: viewer}, RefuseDenied},
		{"meta as an operator", wire.Change{Kind: wire.KindMeta, Device: "d1", Meta: &wire.Meta{Region: "north", Owners: []string{"op"}, Stamp: n.clock.Now()},
			Actor: "op", Proof: op}, RefuseDenied},
		{"desired with someone else's token", wire.Change{Kind: wire.KindDesired, Device: "d1", Doc: desired("valve", `"open"`, n.clock.Now()),
			Actor: "admin", Proof: op}, RefuseActorMismatch},
		{"desired with a garbled token", wire.Change{Kind: wire.KindDesired, Device: "d1", Doc: desired("valve", `"open"`, n.clock.Now()),
			Proof: op[:len(op)-4] + "AAAA"}, RefuseInvalid},
	}
	results := make([]wire.StateResult, len(refused))
	for i, tc := range refused {
		so, err := n.svc.State(ctx, "eB", &wire.StateBatch{Changes: []wire.Change{tc.change}})
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		results[i] = so.StateResult
	}
	d, err := n.svc.Device(ctx, "d1")
	if err != nil {
		t.Fatal(err)
	}
	if f, ok := d.Desired["valve"]; ok && !f.Deleted {
		t.Fatalf("a refused desired write was stored: %s", f.Value)
	}
	if d.Region != "north" || d.EdgeID != "eA" || len(d.Owners) != 1 || d.Owners[0] != "viewer" {
		t.Fatalf("a refused meta write changed d1: region %q owners %v home %q", d.Region, d.Owners, d.EdgeID)
	}
	for _, c := range n.pulled(t, "eA") {
		if f, ok := c.Doc["valve"]; ok && !f.Deleted {
			t.Fatalf("the home edge is sent the refused desired value %s", f.Value)
		}
		if c.Meta != nil && c.Meta.Region != "north" {
			t.Fatalf("the home edge is sent the refused meta %+v", c.Meta)
		}
	}
	for i, tc := range refused {
		if so := results[i]; so.Refused != 1 || so.RefusedReasons[tc.reason] != 1 {
			t.Fatalf("%s: result %+v, want refused for %s", tc.name, so, tc.reason)
		}
		if got := daemontest.Metric(t, n.reg, "outpost_cloud_changes_refused_total", "edge", "eB", "reason", tc.reason); got < 1 {
			t.Fatalf("%s: not counted under %s", tc.name, tc.reason)
		}
	}
	// eB's copy returns to the cloud's: a tombstone for the field the
	// cloud never had, the cloud's meta, each stamped after eB's writes.
	var tomb, meta bool
	for _, c := range n.pulled(t, "eB") {
		if f, ok := c.Doc["valve"]; ok && f.Deleted {
			tomb = true
		}
		if c.Meta != nil && c.Meta.Region == "north" {
			meta = true
		}
	}
	if !tomb || !meta {
		t.Fatalf("eB's corrections: tombstone %v, meta %v; want both", tomb, meta)
	}

	// The operator of d1's region, with the token they presented at eB.
	stamp := n.clock.Now()
	po, err := n.svc.Push(ctx, "eB", &wire.PushBatch{Edge: "eB", FirstSeq: 1, Changes: []wire.Change{
		{Kind: wire.KindDesired, Device: "d1", Doc: desired("valve", `"half"`, stamp), Actor: "op", Proof: op}}})
	if err != nil || po.Refused != 0 {
		t.Fatalf("operator's write: %+v, %v; want accepted", po.PushResult, err)
	}
	if d, err = n.svc.Device(ctx, "d1"); err != nil || string(d.Desired["valve"].Value) != `"half"` {
		t.Fatalf("operator's write not stored: %v %v", d.Desired, err)
	}
	var home bool
	for _, c := range n.pulled(t, "eA") {
		if f, ok := c.Doc["valve"]; ok && string(f.Value) == `"half"` {
			home = true
			if c.Proof != "" {
				t.Fatal("the proof token is forwarded to the home edge")
			}
		}
	}
	if !home {
		t.Fatal("the home edge is not sent the operator's write")
	}
}

// TestSecurityOfflineProof: a user's change synced long after it was made
// is judged by its original proof at the change's time (finding 3's proof
// rule): accepted hours after the token expired, refused once older than
// MaxOffline, and refused before the token was valid.
func TestSecurityOfflineProof(t *testing.T) {
	n := restrictedCloud(t, Config{AccessTTL: 2 * time.Second, MaxOffline: 3 * time.Hour})
	ctx := context.Background()
	op := n.token(t, "op")
	made := n.clock.Now()
	n.offset.Store((2 * time.Hour).Milliseconds()) // the link returns two hours later
	so, err := n.svc.State(ctx, "eB", &wire.StateBatch{Changes: []wire.Change{
		{Kind: wire.KindDesired, Device: "d1", Doc: desired("mode", `"eco"`, made), Actor: "op", Proof: op}}})
	if err != nil || so.Refused != 0 {
		t.Fatalf("offline write on its original proof: %+v %v; want accepted", so.StateResult, err)
	}
	n.offset.Store((4 * time.Hour).Milliseconds())
	so, err = n.svc.State(ctx, "eB", &wire.StateBatch{Changes: []wire.Change{
		{Kind: wire.KindDesired, Device: "d1", Doc: desired("mode", `"boost"`, made+1), Actor: "op", Proof: op}}})
	if err != nil || so.RefusedReasons[RefuseTooOld] != 1 {
		t.Fatalf("write older than max_offline: %+v %v; want refused as too old", so.StateResult, err)
	}
	before := hlc.New(made.WallMs()-time.Hour.Milliseconds(), 0)
	so, err = n.svc.State(ctx, "eB", &wire.StateBatch{Changes: []wire.Change{
		{Kind: wire.KindDesired, Device: "d1", Doc: desired("mode", `"boost"`, before), Actor: "op", Proof: op}}})
	if err != nil || so.Refused != 1 {
		t.Fatalf("write stamped before the token was issued: %+v %v; want refused", so.StateResult, err)
	}
}

// TestSecuritySequenceSquatting: Low finding "sequence squatting", a
// holder of an edge's token pushed sequence numbers first, and the real
// edge's changes with those numbers were acknowledged as duplicates and
// dropped. Now a sequence applied with other content is an error, while an
// identical re-send is still an idempotent duplicate.
func TestSecuritySequenceSquatting(t *testing.T) {
	n := startService(t, Config{})
	ctx := context.Background()
	forged := batch("eA", 1, 3)
	for i := range forged.Changes {
		forged.Changes[i].Readings[0].Metrics["v"] = 666
	}
	if _, err := n.svc.Push(ctx, "eA", forged); err != nil {
		t.Fatal(err)
	}
	// The real edge, same sequence numbers, its own content: entirely
	// below the acknowledged sequence, and overlapping it.
	for _, real := range []*wire.PushBatch{batch("eA", 1, 3), batch("eA", 1, 5)} {
		_, err := n.svc.Push(ctx, "eA", real)
		var conflict *SeqConflictError
		if !errors.Is(err, ErrSeqConflict) || !errors.As(err, &conflict) {
			t.Fatalf("real batch %d..%d: err = %v, want ErrSeqConflict", real.FirstSeq, real.LastSeq(), err)
		}
	}
	if got := daemontest.Metric(t, n.reg, "outpost_cloud_seq_conflicts_total", "edge", "eA"); got != 2 {
		t.Fatalf("outpost_cloud_seq_conflicts_total = %v, want 2", got)
	}
	if got := n.fsm.EdgeSeq("eA"); got != 3 {
		t.Fatalf("acked seq %d after the conflicts, want 3", got)
	}
	// An identical re-send is a duplicate; one that extends it applies
	// only what is new.
	out, err := n.svc.Push(ctx, "eA", forged)
	if err != nil || out.AckedSeq != 3 || out.Applied != 0 {
		t.Fatalf("identical re-send: %+v %v, want a duplicate", out.PushResult, err)
	}
	ext := batch("eA", 1, 4)
	copy(ext.Changes, forged.Changes)
	if out, err = n.svc.Push(ctx, "eA", ext); err != nil || out.AckedSeq != 4 || out.Applied != 1 {
		t.Fatalf("re-send extended by one: %+v %v, want one applied", out.PushResult, err)
	}
}

// TestRuleActorAuthority: a desired change whose actor is "rule:<name>"
// carries the cloud's authority only as that distributed rule's own
// action: the rule is distributed to the edge's region, selects the
// device, and one of its set_desired actions writes exactly those fields
// and values. A forged "rule:x" from an edge (no such distributed rule),
// another region's edge, other values or extra fields, and a device the
// rule does not select are refused and corrected back.
func TestRuleActorAuthority(t *testing.T) {
	n := restrictedCloud(t, Config{})
	ctx := context.Background()
	for edge, region := range map[string]string{"eA": "north", "eS": "south"} {
		if _, err := n.svc.Heartbeat(ctx, edge, &wire.Heartbeat{Edge: edge, Region: region}); err != nil {
			t.Fatal(err)
		}
	}
	fan := rules.Rule{Name: "fan", When: "temp > 30", Actions: []rules.Action{{SetDesired: map[string]json.RawMessage{"fan": json.RawMessage(`"on"`)}}}}
	other := rules.Rule{Name: "other", When: "temp > 30", Devices: rules.Selector{IDs: []string{"d2"}},
		Actions: []rules.Action{{SetDesired: map[string]json.RawMessage{"fan": json.RawMessage(`"on"`)}}}}
	for _, r := range []rules.Rule{fan, other} {
		if _, err := n.svc.PutRule(ctx, r, "north"); err != nil {
			t.Fatal(err)
		}
	}
	two := desired("fan", `"on"`, n.clock.Now())
	two["lock"] = shadow.Field{Value: json.RawMessage(`"open"`), Stamp: n.clock.Now()}
	tests := []struct {
		name, edge, actor string
		doc               shadow.Doc
		want              string // refusal reason, "" accepted
	}{
		{"forged rule actor", "eA", "rule:x", desired("fan", `"on"`, n.clock.Now()), RefuseRuleNotDistributed},
		{"another region's edge", "eS", "rule:fan", desired("fan", `"on"`, n.clock.Now()), RefuseRuleNotDistributed},
		{"another value", "eA", "rule:fan", desired("fan", `"off"`, n.clock.Now()), RefuseRuleMismatch},
		{"an extra field", "eA", "rule:fan", two, RefuseRuleMismatch},
		{"a device the rule does not select", "eA", "rule:other", desired("fan", `"on"`, n.clock.Now()), RefuseRuleMismatch},
		{"the rule's own action", "eA", "rule:fan", nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.doc == nil { // stamped after the corrections above, so it wins
				tt.doc = desired("fan", ` "on" `, n.clock.Now())
			}
			so, err := n.svc.State(ctx, tt.edge, &wire.StateBatch{Changes: []wire.Change{{Kind: wire.KindDesired, Device: "d1", Doc: tt.doc, Actor: tt.actor}}})
			if err != nil {
				t.Fatal(err)
			}
			if tt.want == "" {
				if so.Refused != 0 {
					t.Fatalf("refused %+v", so.StateResult)
				}
				d, err := n.fsm.GetDevice("d1")
				if err != nil || string(d.Desired["fan"].Value) != ` "on" ` && string(d.Desired["fan"].Value) != `"on"` {
					t.Fatalf("desired at the cloud: %+v %v", d, err)
				}
				return
			}
			if so.Refused != 1 || so.RefusedReasons[tt.want] != 1 {
				t.Fatalf("result %+v, want refused for %s", so.StateResult, tt.want)
			}
		})
	}
}
