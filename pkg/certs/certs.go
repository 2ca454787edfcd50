// Package certs turns the PEM files an operator configures into the TLS
// settings of Outpost's links: the cluster's mutual TLS (raft and
// node-to-node HTTP, one private CA whose every certificate is a member),
// cloud-sync's public HTTP port, and the CA bundle an edge trusts for its
// https:// cloud URLs.
//
// The cluster and the public clients share cloud-sync's HTTP port. A node
// calling another node offers the ALPN protocol ClusterALPN; for it, and
// only for it, the port presents the node's cluster certificate and
// requires a client certificate from the cluster CA. Everyone else gets the
// public certificate and no client-certificate request, so browsers, phones
// and edges never see the cluster's PKI, and a request counts as a node's
// only when the handshake verified that node's certificate (IsClusterPeer).
package certs

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"slices"
)

// ClusterALPN is the TLS application protocol a node offers on another
// node's HTTP port to be served, and verified, as a cluster member.
const ClusterALPN = "outpost-cluster/1"

// ErrNoCertificates: a CA file holds no PEM certificate.
var ErrNoCertificates = errors.New("no PEM certificate found")

// Cluster is a node's cluster credential: the cluster CA and the node's
// certificate and key. Every certificate the CA signs is a member, so the
// CA must be dedicated to one cluster.
type Cluster struct {
	pool *x509.CertPool
	cert tls.Certificate
}

// LoadCluster reads the cluster CA bundle and this node's certificate and
// key (PEM files).
func LoadCluster(caFile, certFile, keyFile string) (*Cluster, error) {
	pool, err := LoadPool(caFile)
	if err != nil {
		return nil, fmt.Errorf("cluster CA: %w", err)
	}
	cert, err := LoadKeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("cluster certificate: %w", err)
	}
	return &Cluster{pool: pool, cert: cert}, nil
}

// ServerConfig is the raft listener's: a peer must present a certificate
// the cluster CA signed, or the handshake fails before raft reads a byte.
// TLS 1.3 only: both ends are cloud-sync.
func (c *Cluster) ServerConfig() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{c.cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    c.pool,
	}
}

// ClientConfig is for dialing a peer (raft, or its HTTP port): it presents
// this node's certificate, offers ClusterALPN, and accepts only a server
// certificate from the cluster CA valid for the dialed host.
func (c *Cluster) ClientConfig() *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{c.cert},
		RootCAs:      c.pool,
		NextProtos:   []string{ClusterALPN},
	}
}

// HTTPServerConfig is cloud-sync's HTTP port: public is the certificate
// presented to ordinary clients (nil: the cluster certificate), cluster the
// node's credential (nil: no cluster TLS, then public must be set). A
// client offering ClusterALPN gets the cluster's mutual TLS instead.
func HTTPServerConfig(public *tls.Certificate, cluster *Cluster) (*tls.Config, error) {
	if public == nil && cluster == nil {
		return nil, errors.New("certs: HTTP TLS needs a public or a cluster certificate")
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if public != nil {
		cfg.Certificates = []tls.Certificate{*public}
	} else {
		cfg.Certificates = []tls.Certificate{cluster.cert}
	}
	if cluster == nil {
		return cfg, nil
	}
	member := cluster.ServerConfig()
	member.NextProtos = []string{ClusterALPN}
	cfg.GetConfigForClient = func(hi *tls.ClientHelloInfo) (*tls.Config, error) {
		if slices.Contains(hi.SupportedProtos, ClusterALPN) {
			return member, nil
		}
		return nil, nil // the public settings above
	}
	return cfg, nil
}

// IsClusterPeer reports whether a connection's handshake verified a
// cluster member's certificate (see HTTPServerConfig). nil (plain HTTP) is
// false.
func IsClusterPeer(st *tls.ConnectionState) bool {
	return st != nil && st.HandshakeComplete && st.NegotiatedProtocol == ClusterALPN && len(st.VerifiedChains) > 0
}

// LoadPool reads a PEM bundle of CA certificates.
func LoadPool(file string) (*x509.CertPool, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("%s: %w", file, ErrNoCertificates)
	}
	return pool, nil
}

// LoadKeyPair reads a PEM certificate (chain) and its private key.
func LoadKeyPair(certFile, keyFile string) (tls.Certificate, error) {
	c, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return c, fmt.Errorf("%s, %s: %w", certFile, keyFile, err)
	}
	return c, nil
}

// ClientConfig is an edge's (or any client's) settings for https:// URLs:
// caFile's bundle as the trusted roots, or the system's when caFile is "".
func ClientConfig(caFile string) (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile == "" {
		return cfg, nil
	}
	pool, err := LoadPool(caFile)
	if err != nil {
		return nil, err
	}
	cfg.RootCAs = pool
	return cfg, nil
}

// PeerConfig is how a node without cluster TLS (development, raft on
// loopback) calls another node whose HTTP port serves public: it trusts the
// system roots and public's own chain, which every node of such a cluster
// shares.
func PeerConfig(public tls.Certificate) (*tls.Config, error) {
	pool, err := x509.SystemCertPool()
	if err != nil {
		pool = x509.NewCertPool()
	}
	for _, der := range public.Certificate {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("certs: public certificate: %w", err)
		}
		pool.AddCert(c)
	}
	return &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool}, nil
}
