package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/outpost-edge/outpost/internal/devcerts"
	"github.com/outpost-edge/outpost/pkg/config"
)

// runCerts is `cloud-sync certs`: a development CA and node certificates,
// ready for -cluster-ca/-cluster-cert/-cluster-key (and -tls-cert, and an
// edge's -cloud-ca).
func runCerts(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("cloud-sync certs", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("dir", "", "directory to write ca.pem, <name>.pem and <name>-key.pem into (required)")
	nodes := fs.String("nodes", "", "`names` (comma-separated) that get a certificate each, e.g. n1,n2,n3 (required)")
	hosts := fs.String("hosts", "", "extra SANs (comma-separated DNS names or IPs) of every certificate; localhost, 127.0.0.1 and ::1 are always in")
	validity := fs.Duration("validity", devcerts.DefaultValidity, "certificate lifetime")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: cloud-sync certs -dir DIR -nodes n1,n2,n3 [-hosts h1,h2] [-validity 168h]\n\n"+
			"Makes a DEVELOPMENT CA and ECDSA P-256 certificates (server and client use) for cloud-sync's cluster\n"+
			"mutual TLS and public TLS. Production clusters use their own PKI (see docs/security.md).\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	names := config.SplitList(*nodes)
	if *dir == "" || len(names) == 0 || fs.NArg() > 0 {
		fmt.Fprintln(stderr, "cloud-sync certs: -dir and -nodes are required")
		return 2
	}
	set, err := devcerts.Write(*dir, devcerts.Options{Names: names, Hosts: config.SplitList(*hosts), Validity: *validity})
	if err != nil {
		fmt.Fprintf(stderr, "cloud-sync certs: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "CA %s (valid until %s)\n", set.CA, time.Now().Add(*validity).UTC().Format(time.RFC3339))
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(stdout, "%s: %s\n", n, strings.Join(set.ClusterArgs(n), " "))
	}
	return 0
}
