// Package devcerts makes a throw-away PKI for development, tests, the demo
// and the benchmarks: a CA and, per name, an ECDSA P-256 certificate valid
// for that name, localhost, 127.0.0.1 and ::1 (plus any extra hosts), usable
// both as a TLS server and as a TLS client, so one file pair serves as a
// cloud-sync node's cluster certificate and as its public one. Validity is
// short; nothing here is meant for production keys.
package devcerts

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// DefaultValidity is how long certificates last unless Options says.
const DefaultValidity = 7 * 24 * time.Hour

// Options says what to make.
type Options struct {
	// Names get one certificate each (file names <name>.pem and
	// <name>-key.pem); each is also a DNS SAN of its certificate.
	Names []string
	// Hosts are extra SANs (DNS names or IP addresses) of every
	// certificate.
	Hosts []string
	// Validity (default DefaultValidity).
	Validity time.Duration
	// Org names the CA's subject (default "Outpost development").
	Org string
}

// Set is what Write made: file paths, by name.
type Set struct {
	Dir string
	CA  string // ca.pem
	// Certs maps a name to its certificate and key files.
	Certs map[string]Pair
}

// Pair is one certificate and its key.
type Pair struct{ Cert, Key string }

// ClusterArgs are the cloud-sync flags giving node name this set's cluster
// credential.
func (s *Set) ClusterArgs(name string) []string {
	p := s.Certs[name]
	return []string{"-cluster-ca", s.CA, "-cluster-cert", p.Cert, "-cluster-key", p.Key}
}

// TLSArgs are the cloud-sync flags serving the public port with name's
// certificate.
func (s *Set) TLSArgs(name string) []string {
	p := s.Certs[name]
	return []string{"-tls-cert", p.Cert, "-tls-key", p.Key}
}

// Write makes a new CA and the named certificates in dir (created 0700;
// keys are written 0600). Existing files are overwritten.
func Write(dir string, o Options) (*Set, error) {
	if len(o.Names) == 0 {
		return nil, errors.New("devcerts: no names")
	}
	for _, n := range o.Names {
		if n == "" || n == "ca" || n == "." || n == ".." || strings.ContainsAny(n, `/\`) {
			return nil, fmt.Errorf("devcerts: %q cannot name a certificate file", n)
		}
	}
	if o.Validity <= 0 {
		o.Validity = DefaultValidity
	}
	if o.Org == "" {
		o.Org = "Outpost development"
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("devcerts: %w", err)
	}
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("devcerts: %w", err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{Organization: []string{o.Org}, CommonName: o.Org + " CA"},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(o.Validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, fmt.Errorf("devcerts: CA: %w", err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	set := &Set{Dir: dir, CA: filepath.Join(dir, "ca.pem"), Certs: map[string]Pair{}}
	if err := writePEM(set.CA, "CERTIFICATE", caDER, 0o644); err != nil {
		return nil, err
	}
	for _, name := range o.Names {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, fmt.Errorf("devcerts: %w", err)
		}
		tmpl := &x509.Certificate{
			SerialNumber: serial(),
			Subject:      pkix.Name{Organization: []string{o.Org}, CommonName: name},
			NotBefore:    now.Add(-time.Minute),
			NotAfter:     now.Add(o.Validity),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
			DNSNames:     []string{name, "localhost"},
			IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		}
		for _, h := range o.Hosts {
			if ip := net.ParseIP(h); ip != nil {
				tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
			} else {
				tmpl.DNSNames = append(tmpl.DNSNames, h)
			}
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return nil, fmt.Errorf("devcerts: %s: %w", name, err)
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, fmt.Errorf("devcerts: %s: %w", name, err)
		}
		p := Pair{Cert: filepath.Join(dir, name+".pem"), Key: filepath.Join(dir, name+"-key.pem")}
		if err := writePEM(p.Cert, "CERTIFICATE", der, 0o644); err != nil {
			return nil, err
		}
		if err := writePEM(p.Key, "PRIVATE KEY", keyDER, 0o600); err != nil {
			return nil, err
		}
		set.Certs[name] = p
	}
	return set, nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand does not fail on supported platforms
	}
	return n
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	b := pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
	if err := os.WriteFile(path, b, mode); err != nil {
		return fmt.Errorf("devcerts: %w", err)
	}
	return nil
}
