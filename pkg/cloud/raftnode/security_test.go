package raftnode

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/outpost-edge/outpost/internal/devcerts"
	"github.com/outpost-edge/outpost/pkg/certs"
	"github.com/outpost-edge/outpost/pkg/cloud/fsm"
	"github.com/outpost-edge/outpost/pkg/wire"
)

// clusterCreds makes a dev CA in a temp dir and loads the named members'
// cluster credentials, and the CA as a pool.
func clusterCreds(t *testing.T, names ...string) (map[string]*certs.Cluster, *x509.CertPool) {
	t.Helper()
	set, err := devcerts.Write(t.TempDir(), devcerts.Options{Names: names})
	if err != nil {
		t.Fatal(err)
	}
	pool, err := certs.LoadPool(set.CA)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*certs.Cluster{}
	for _, n := range names {
		p := set.Certs[n]
		c, err := certs.LoadCluster(set.CA, p.Cert, p.Key)
		if err != nil {
			t.Fatal(err)
		}
		out[n] = c
	}
	return out, pool
}

// settledApplied waits until f's applied index has not moved for 300ms
// and returns it.
func settledApplied(t *testing.T, f *fsm.FSM) uint64 {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	last, since := f.AppliedIndex(), time.Now()
	for time.Since(since) < 300*time.Millisecond {
		if time.Now().After(deadline) {
			t.Fatal("applied index did not settle within 10s")
		}
		time.Sleep(20 * time.Millisecond)
		if a := f.AppliedIndex(); a != last {
			last, since = a, time.Now()
		}
	}
	return last
}

// tlsTransport is a raft transport that dials with client.
func tlsTransport(t *testing.T, cred *certs.Cluster, client *tls.Config) *raft.NetworkTransport {
	t.Helper()
	s, err := newTLSStream("127.0.0.1:0", nil, cred.ServerConfig(), client)
	if err != nil {
		t.Fatal(err)
	}
	tr := raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{Stream: s, MaxPool: 1, Timeout: 2 * time.Second})
	t.Cleanup(func() { _ = tr.Close() })
	return tr
}

// TestSecurityRaftTransport: finding 1 — the raft transport answered anyone
// who could reach it: a process using hashicorp/raft's own NewTCPTransport
// appended a committed entry that made a user admin, and forced elections
// with a high term. With cluster TLS, a peer without a certificate from the
// cluster CA (none, or another CA's) fails the handshake: the term does not
// move and nothing is applied. A member's certificate still gets through.
func TestSecurityRaftTransport(t *testing.T) {
	creds, pool := clusterCreds(t, "n1", "n2")
	n, f, _ := startNode(t, Config{TLS: creds["n1"]})
	target := raft.ServerAddress(n.cfg.RaftAdvertise)
	// The new leader writes a few entries of its own (e.g. the signing
	// key): the baseline is taken once they are applied.
	applied := settledApplied(t, f)
	term := n.raft.CurrentTerm()

	evil, err := fsm.EncodeCommand(&fsm.Command{Type: fsm.CmdUserPut, AtMs: 1,
		User: &wire.User{OpenID: "mallory", Roles: []string{"admin"}}})
	if err != nil {
		t.Fatal(err)
	}
	appendReq := func() *raft.AppendEntriesRequest {
		return &raft.AppendEntriesRequest{
			RPCHeader: raft.RPCHeader{ProtocolVersion: raft.ProtocolVersionMax, ID: []byte("mallory"), Addr: []byte("127.0.0.1:1")},
			Term:      term + 1000, PrevLogEntry: n.raft.LastIndex(), PrevLogTerm: term,
			Entries: []*raft.Log{{Index: n.raft.LastIndex() + 1, Term: term + 1000, Type: raft.LogCommand,
				Data: fsm.EncodeEntry([][]byte{evil})}},
			LeaderCommitIndex: n.raft.LastIndex() + 1,
		}
	}
	voteReq := func() *raft.RequestVoteRequest {
		return &raft.RequestVoteRequest{RPCHeader: raft.RPCHeader{ProtocolVersion: raft.ProtocolVersionMax, ID: []byte("mallory"), Addr: []byte("127.0.0.1:1")},
			Term: term + 2000, LastLogIndex: 1 << 40, LastLogTerm: term + 2000}
	}

	plain, err := raft.NewTCPTransport("127.0.0.1:0", nil, 1, 2*time.Second, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = plain.Close() })
	others, _ := clusterCreds(t, "n1") // same name, another CA
	// The stranger trusts the cluster's CA, so it is the server that must
	// refuse its certificate.
	stranger := others["n1"].ClientConfig()
	stranger.RootCAs = pool
	noCert := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}
	attackers := []struct {
		name string
		tr   *raft.NetworkTransport
	}{
		{"plain TCP (raft.NewTCPTransport)", plain},
		{"TLS with another CA's certificate", tlsTransport(t, others["n1"], stranger)},
		{"TLS without a certificate", tlsTransport(t, others["n1"], noCert)},
	}
	for _, a := range attackers {
		t.Run(a.name, func(t *testing.T) {
			var ar raft.AppendEntriesResponse
			if err := a.tr.AppendEntries("n1", target, appendReq(), &ar); err == nil {
				t.Errorf("AppendEntries was answered: %+v", ar)
			}
			var vr raft.RequestVoteResponse
			if err := a.tr.RequestVote("n1", target, voteReq(), &vr); err == nil {
				t.Errorf("RequestVote was answered: %+v", vr)
			}
		})
	}
	// Give a misbehaving node every chance to show the attack took.
	time.Sleep(200 * time.Millisecond)
	if got := n.raft.CurrentTerm(); got != term {
		t.Errorf("term moved from %d to %d", term, got)
	}
	if got := f.AppliedIndex(); got != applied {
		t.Errorf("applied index moved from %d to %d", applied, got)
	}
	if u, err := f.GetUser("mallory"); err == nil && u != nil {
		t.Errorf("the forged user was applied: %+v", u)
	} else if err != nil && !errors.Is(err, fsm.ErrNotFound) {
		t.Fatal(err)
	}
	if !n.IsLeader() {
		t.Error("the node lost leadership")
	}

	// The control: a member's certificate is answered (the attack above
	// failed for its credential, not for its shape).
	var vr raft.RequestVoteResponse
	if err := tlsTransport(t, creds["n2"], creds["n2"].ClientConfig()).RequestVote("n1", target, voteReq(), &vr); err != nil {
		t.Fatalf("a member's RequestVote failed: %v", err)
	}
}

// TestTLSStreamHandshakeFailsFast: a client that speaks plain bytes where a
// ClientHello belongs is answered with an alert and dropped.
func TestTLSStreamHandshakeFailsFast(t *testing.T) {
	creds, _ := clusterCreds(t, "n1")
	s, err := newTLSStream("127.0.0.1:0", nil, creds["n1"].ServerConfig(), creds["n1"].ClientConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	go func() {
		c, err := s.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = c.Read(make([]byte, 1))
	}()
	c, err := net.Dial("tcp", s.ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, _ = c.Write([]byte("\x00\x00\x00\x00plain raft"))
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Fatalf("server kept the connection open after a non-TLS hello (read %q)", b)
	}
}
