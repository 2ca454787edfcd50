package certs_test

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/outpost-edge/outpost/internal/devcerts"
	"github.com/outpost-edge/outpost/pkg/certs"
)

func TestLoadPoolRefusesNonPEM(t *testing.T) {
	f := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(f, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := certs.LoadPool(f); !errors.Is(err, certs.ErrNoCertificates) {
		t.Fatalf("err %v, want ErrNoCertificates", err)
	}
	if _, err := certs.LoadPool(filepath.Join(t.TempDir(), "none.pem")); err == nil {
		t.Fatal("a missing file loaded")
	}
}

// TestHTTPServerConfig: the shared HTTP port serves the public certificate
// and asks nothing of ordinary clients, and switches to the cluster's
// mutual TLS for a client offering ClusterALPN.
func TestHTTPServerConfig(t *testing.T) {
	set, err := devcerts.Write(t.TempDir(), devcerts.Options{Names: []string{"n1", "server"}, Validity: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	cl, err := certs.LoadCluster(set.CA, set.Certs["n1"].Cert, set.Certs["n1"].Key)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := certs.LoadKeyPair(set.Certs["server"].Cert, set.Certs["server"].Key)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := certs.HTTPServerConfig(nil, nil); err == nil {
		t.Fatal("a config with no certificate at all")
	}
	cfg, err := certs.HTTPServerConfig(&pub, cl)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.ClientAuth != tls.NoClientCert || cfg.MinVersion < tls.VersionTLS12 {
		t.Fatalf("public settings: client auth %v, min version %x", cfg.ClientAuth, cfg.MinVersion)
	}
	public, _ := cfg.GetConfigForClient(&tls.ClientHelloInfo{SupportedProtos: []string{"h2", "http/1.1"}})
	if public != nil {
		t.Fatal("an ordinary client got the cluster's settings")
	}
	member, _ := cfg.GetConfigForClient(&tls.ClientHelloInfo{SupportedProtos: []string{certs.ClusterALPN}})
	if member == nil || member.ClientAuth != tls.RequireAndVerifyClientCert || member.ClientCAs == nil || member.MinVersion != tls.VersionTLS13 {
		t.Fatalf("cluster settings: %+v", member)
	}
	leaf, _ := x509.ParseCertificate(member.Certificates[0].Certificate[0])
	if leaf.Subject.CommonName != "n1" {
		t.Fatalf("members are shown %q, want the cluster certificate", leaf.Subject.CommonName)
	}
	if certs.IsClusterPeer(nil) || certs.IsClusterPeer(&tls.ConnectionState{HandshakeComplete: true, NegotiatedProtocol: certs.ClusterALPN}) {
		t.Fatal("a connection without a verified chain counts as a member")
	}
}

// TestDevCerts: every certificate verifies against the CA for server and
// client use and for localhost, 127.0.0.1, its name and the extra hosts;
// keys are private to the owner; bad names are refused.
func TestDevCerts(t *testing.T) {
	dir := t.TempDir()
	set, err := devcerts.Write(dir, devcerts.Options{Names: []string{"n1"}, Hosts: []string{"node.example", "10.0.0.9"}})
	if err != nil {
		t.Fatal(err)
	}
	pool, err := certs.LoadPool(set.CA)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := certs.LoadKeyPair(set.Certs["n1"].Cert, set.Certs["n1"].Key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(pair.Certificate[0])
	for _, host := range []string{"n1", "localhost", "127.0.0.1", "::1", "node.example", "10.0.0.9"} {
		for _, use := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: host, KeyUsages: []x509.ExtKeyUsage{use}}); err != nil {
				t.Errorf("%s (usage %v): %v", host, use, err)
			}
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, DNSName: "elsewhere.example"}); err == nil {
		t.Error("valid for a host it does not name")
	}
	if fi, err := os.Stat(set.Certs["n1"].Key); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("key mode %v %v, want 0600", fi.Mode(), err)
	}
	for _, bad := range []string{"", "ca", "../x", "a/b"} {
		if _, err := devcerts.Write(dir, devcerts.Options{Names: []string{bad}}); err == nil {
			t.Errorf("name %q accepted", bad)
		}
	}
}
