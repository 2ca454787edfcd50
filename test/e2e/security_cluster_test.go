package e2e

// Security regression tests of the cluster and the edge↔cloud transport
// (issue 11: findings 1 and 8, and the unauthenticated-information one).

import (
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/outpost-edge/outpost/pkg/certs"
)

// TestSecurityClusterMutualTLS: finding 1 — the raft transport answered
// anyone who could reach it. Three processes with cluster mutual TLS
// elect, join and replicate (through a follower); a fourth node with a
// certificate and no API token joins on its certificate alone; a process
// using hashicorp/raft's plain NewTCPTransport is refused by every node
// (the term does not move); and an https caller without a certificate
// gets no status.
func TestSecurityClusterMutualTLS(t *testing.T) {
	c := startCloudCluster(t, 3, cloudWithTLS("n3", "operator"))
	lead := c.mustLeader(10 * time.Second)
	st, err := c.status(c.Nodes[lead])
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range c.Nodes {
		if strings.Contains(n.Log(), "cluster TLS is off") {
			t.Fatalf("%s runs without cluster TLS:\n%s", n.ID, cloudTail(n.Log(), 2000))
		}
	}

	// Replication, with the write forwarded by a follower over https.
	f := c.follower()
	body := map[string]any{"state": map[string]any{"mode": "tls"}}
	if code, env, err := c.api(c.Nodes[f], http.MethodPut, "/api/v1/devices/tls-dev/desired", body); err != nil || code != 200 {
		t.Fatalf("desired through follower %s: %d %s %v", c.Nodes[f].ID, code, env.Message, err)
	}
	for _, n := range c.Nodes {
		cloudWaitFor(t, 10*time.Second, n.ID+" holds the write", func() bool {
			d, err := c.deviceState(n, "tls-dev")
			return err == nil && string(d.Desired["mode"]) == `"tls"`
		})
	}

	ref, err := c.status(c.Nodes[lead])
	if err != nil {
		t.Fatal(err)
	}

	// A node with only its certificate (no -api-token) joins.
	c.Nodes = append(c.Nodes, &cloudNode{ID: "n3", Raft: cloudFreePort(t), HTTP: cloudFreePort(t),
		Data: filepath.Join(t.TempDir(), "n3"), https: true, noToken: true, joinURLs: []string{c.Nodes[f].URL()}})
	c.start(3)
	// n3 has no API token: read its status as an operator holding a
	// cluster certificate.
	op, err := certs.LoadCluster(c.certs.CA, c.certs.Certs["operator"].Cert, c.certs.Certs["operator"].Key)
	if err != nil {
		t.Fatal(err)
	}
	opc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: op.ClientConfig()}}
	defer opc.CloseIdleConnections()
	cloudWaitFor(t, 20*time.Second, "n3 a member holding the replicated write", func() bool {
		for _, nd := range c.Nodes[:3] {
			if st, err := c.status(nd); err != nil || len(st.Nodes) != 4 {
				return false
			}
		}
		resp, err := opc.Get(c.Nodes[3].URL() + "/cluster/v1/status")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		var env struct {
			Data cloudStatus `json:"data"`
		}
		return resp.StatusCode == 200 && json.NewDecoder(resp.Body).Decode(&env) == nil &&
			len(env.Data.Nodes) == 4 && env.Data.AppliedIndex >= ref.AppliedIndex
	})

	// Plain raft against every node: refused, term unchanged.
	plain, err := raft.NewTCPTransport("127.0.0.1:0", nil, 1, 2*time.Second, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	for _, n := range c.Nodes {
		var resp raft.RequestVoteResponse
		err := plain.RequestVote(raft.ServerID(n.ID), raft.ServerAddress(n.Raft), &raft.RequestVoteRequest{
			RPCHeader: raft.RPCHeader{ProtocolVersion: raft.ProtocolVersionMax, ID: []byte("mallory"), Addr: []byte("127.0.0.1:1")},
			Term:      st.Term + 1000, LastLogIndex: 1 << 40, LastLogTerm: st.Term + 1000,
		}, &resp)
		if err == nil {
			t.Errorf("%s answered a plain-TCP RequestVote: %+v", n.ID, resp)
		}
	}
	after, err := c.status(c.Nodes[lead])
	if err != nil {
		t.Fatal(err)
	}
	if after.Term != st.Term || after.Leader != st.Leader {
		t.Errorf("term/leader moved from %d/%s to %d/%s", st.Term, st.Leader, after.Term, after.Leader)
	}

	// An https caller that trusts the CA but has no certificate or token.
	for _, path := range []string{"/cluster/v1/status", "/metrics"} {
		code, env, err := c.apiTok(c.Nodes[0], http.MethodGet, path, nil, "")
		if err != nil || code != http.StatusUnauthorized || strings.Contains(string(env.Data), "raft_addr") {
			t.Errorf("GET %s without a credential: %d %s %s %v, want 401", path, code, env.Message, env.Data, err)
		}
	}
}

// TestSecurityJoinWithoutCredential: finding 8 — without -api-token,
// POST /cluster/v1/join was open, and a join naming a dead address broke
// quorum for good. A node with neither the API token nor cluster TLS now
// refuses every join (saying what to configure), and a node that tries to
// join it without a credential exits instead of retrying forever.
func TestSecurityJoinWithoutCredential(t *testing.T) {
	c := &cloudCluster{t: t, bin: buildCloudSync(t), hc: &http.Client{Timeout: 10 * time.Second}}
	n := &cloudNode{ID: "n0", Raft: cloudFreePort(t), HTTP: cloudFreePort(t), Data: filepath.Join(t.TempDir(), "n0"),
		bootstr: true, noToken: true}
	c.Nodes = []*cloudNode{n}
	c.start(0)
	if !strings.Contains(n.Log(), "membership changes") {
		t.Errorf("no start-up warning that membership changes are refused:\n%s", cloudTail(n.Log(), 2000))
	}
	cloudWaitFor(t, 10*time.Second, "a leader (readyz)", func() bool {
		resp, err := c.hc.Get(n.URL() + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	dead := map[string]string{"id": "ghost", "raft_addr": "10.255.255.1:7000", "http_addr": "10.255.255.1:8090"}
	for _, tok := range []string{"", "guessed-token-0123"} {
		code, env, err := c.apiTok(n, http.MethodPost, "/cluster/v1/join", dead, tok)
		if err != nil || code != http.StatusForbidden || !strings.Contains(env.Message, "-api-token") {
			t.Fatalf("join naming a dead address (token %q): %d %q %v, want 403 naming -api-token", tok, code, env.Message, err)
		}
	}
	// Still a healthy one-node cluster: the dead voter was not added.
	if resp, err := c.hc.Get(n.URL() + "/readyz"); err != nil || resp.StatusCode != 200 {
		t.Fatalf("readyz after the refused joins: %v", err)
	} else {
		resp.Body.Close()
	}
	// A real node without a credential is refused and says so.
	j := exec.Command(c.bin, "-id", "n1", "-raft", cloudFreePort(t), "-http", cloudFreePort(t),
		"-data", filepath.Join(t.TempDir(), "n1"), "-join", n.URL())
	out, err := runWithin(j, 20*time.Second)
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(out, "refused (403)") {
		t.Fatalf("joining without a credential: %v\n%s", err, cloudTail(out, 2000))
	}
}

// runWithin runs cmd and returns its combined output, killing it after d.
func runWithin(cmd *exec.Cmd, d time.Duration) (string, error) {
	out := &cloudNode{} // a locked log buffer
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		return "", err
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return out.Log(), err
	case <-time.After(d):
		_ = cmd.Process.Kill()
		<-done
		return out.Log(), errors.New("still running after " + d.String())
	}
}

// TestSecurityRaftOffLoopbackNeedsClusterTLS: without -cluster-* files
// the raft transport is unauthenticated, so a raft address off loopback
// is a usage error (exit 2, naming the key and the fix), and so is an
// incomplete set of cluster files; on loopback the node starts and says
// it runs in unauthenticated development mode.
func TestSecurityRaftOffLoopbackNeedsClusterTLS(t *testing.T) {
	bin := buildCloudSync(t)
	dir := t.TempDir()
	for _, tc := range []struct {
		name string
		args []string
		msg  string
	}{
		{"routable raft address", []string{"-raft", "10.1.2.3:7000"}, `raft: "10.1.2.3:7000" is not a loopback address`},
		{"every interface", []string{"-raft", "0.0.0.0:7000", "-raft-advertise", "127.0.0.1:7000"}, `raft: "0.0.0.0:7000" is not a loopback address`},
		{"routable advertise", []string{"-raft", "127.0.0.1:7000", "-raft-advertise", "cloud-0.example:7000"}, `raft_advertise: "cloud-0.example:7000" is not a loopback address`},
		{"incomplete cluster files", []string{"-raft", "10.1.2.3:7000", "-cluster-ca", filepath.Join(dir, "ca.pem")}, "cluster_cert: is required"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"-id", "a", "-data", dir, "-bootstrap", "-http", cloudFreePort(t)}, tc.args...)
			// Bounded: a node that accepted the address would run on.
			out, err := runWithin(exec.Command(bin, args...), 10*time.Second)
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(out, tc.msg) {
				t.Fatalf("exit %v, output:\n%s\nwant exit 2 mentioning %q", err, out, tc.msg)
			}
		})
	}
	c := startCloudCluster(t, 1)
	if !strings.Contains(c.Nodes[0].Log(), "cluster TLS is off") {
		t.Fatalf("no development-mode notice:\n%s", cloudTail(c.Nodes[0].Log(), 2000))
	}
}

// TestSecurityEdgeToCloudTLS: item 2 — an edge syncs to a cloud serving
// https with a private CA when -cloud-ca names it; an edge without the CA
// refuses the certificate, says so in its log, and keeps ingesting
// offline.
func TestSecurityEdgeToCloudTLS(t *testing.T) {
	c := startCloudCluster(t, 1, cloudWithTLS())
	n := c.Nodes[0]
	trusted := startEdge(t, "-id", "e0", "-cloud", n.URL(), "-cloud-token", cloudEdgeToken("e0"),
		"-cloud-ca", c.certs.CA, "-unsafe-no-fsync")
	mq := edgeConnect(t, trusted.MQTT, "tls-sensor")
	if tk := mq.Publish("sensors/tls-sensor/telemetry", 1, false, []byte(`{"id":"tls-r1","metrics":{"t":21.5}}`)); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("publish: %v", tk.Error())
	}
	cloudWaitFor(t, 30*time.Second, "the reading at the TLS cloud", func() bool {
		ids, err := cloudReadingIDs(t, c, n, "e0")
		return err == nil && ids["tls-r1"] == 1
	})

	untrusting := startEdge(t, "-id", "e1", "-cloud", n.URL(), "-cloud-token", cloudEdgeToken("e1"), "-unsafe-no-fsync")
	cloudWaitFor(t, 30*time.Second, "the edge to log the untrusted certificate", func() bool {
		return strings.Contains(untrusting.log.String(), "TLS certificate is not trusted")
	})
	mq1 := edgeConnect(t, untrusting.MQTT, "offline-sensor")
	if tk := mq1.Publish("sensors/offline-sensor/telemetry", 1, false, []byte(`{"id":"off-r1","metrics":{"t":1}}`)); !tk.WaitTimeout(10*time.Second) || tk.Error() != nil {
		t.Fatalf("offline edge stopped ingesting: %v", tk.Error())
	}
	if ids, err := cloudReadingIDs(t, c, n, "e1"); err != nil || len(ids) != 0 {
		t.Fatalf("the untrusting edge synced anyway: %v %v", ids, err)
	}
	// And the listener itself: a plain-HTTP request to the https port is
	// not served.
	conn, err := net.DialTimeout("tcp", n.HTTP, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, _ = conn.Write([]byte("GET /cluster/v1/status HTTP/1.1\r\nHost: x\r\n\r\n"))
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, _ := io.ReadAll(conn)
	var env cloudEnvelope
	if json.Unmarshal(b, &env) == nil && env.Data != nil {
		t.Fatalf("plain HTTP on the TLS port was answered: %q", b)
	}
}
