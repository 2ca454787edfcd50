// Package auth decides who is calling the cloud: an edge (by its own sync
// token), a service consumer (by the API token) or, later, a user (by a JWT
// access token). Handlers depend only on the Authenticator interface, so the
// identity issue can plug JWT verification in as one more link of a Chain.
package auth

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"strings"
)

// Kind is the kind of caller.
type Kind int

// Caller kinds.
const (
	KindEdge Kind = iota + 1
	KindService
	KindUser
)

// Principal is an authenticated caller.
type Principal struct {
	Kind    Kind
	Edge    string   // KindEdge: the edge id the token belongs to
	Subject string   // KindUser: openid; KindService: "api"
	Roles   []string // KindUser
}

// ErrUnauthenticated means no authenticator accepted the token.
var ErrUnauthenticated = errors.New("missing or unknown credentials")

// Authenticator maps a bearer token to a principal.
type Authenticator interface {
	Authenticate(ctx context.Context, token string) (Principal, error)
}

// Chain tries each authenticator in turn.
type Chain []Authenticator

// Authenticate returns the first principal any link accepts.
func (c Chain) Authenticate(ctx context.Context, token string) (Principal, error) {
	for _, a := range c {
		p, err := a.Authenticate(ctx, token)
		if err == nil {
			return p, nil
		}
		if !errors.Is(err, ErrUnauthenticated) {
			return Principal{}, err
		}
	}
	return Principal{}, ErrUnauthenticated
}

// Static holds the configured shared secrets: one token per edge and an
// optional API token for service consumers. Tokens are compared by SHA-256
// digest in constant time so response timing does not leak them.
type Static struct {
	edges map[[32]byte]string
	api   *[32]byte
}

// NewStatic builds the static authenticator. edgeTokens maps edge id to
// token; apiToken may be empty (no service access).
func NewStatic(edgeTokens map[string]string, apiToken string) (*Static, error) {
	s := &Static{edges: map[[32]byte]string{}}
	for edge, tok := range edgeTokens {
		if len(tok) < 8 {
			return nil, fmt.Errorf("edge token for %q is shorter than 8 characters", edge)
		}
		h := sha256.Sum256([]byte(tok))
		if other, dup := s.edges[h]; dup {
			return nil, fmt.Errorf("edges %q and %q share a token; each edge needs its own", other, edge)
		}
		s.edges[h] = edge
	}
	if apiToken != "" {
		if len(apiToken) < 8 {
			return nil, fmt.Errorf("api token is shorter than 8 characters")
		}
		h := sha256.Sum256([]byte(apiToken))
		if _, dup := s.edges[h]; dup {
			return nil, fmt.Errorf("api token equals an edge token")
		}
		s.api = &h
	}
	return s, nil
}

// Authenticate implements Authenticator.
func (s *Static) Authenticate(_ context.Context, token string) (Principal, error) {
	if token == "" {
		return Principal{}, ErrUnauthenticated
	}
	h := sha256.Sum256([]byte(token))
	if s.api != nil && subtle.ConstantTimeCompare(h[:], s.api[:]) == 1 {
		return Principal{Kind: KindService, Subject: "api"}, nil
	}
	// Map lookup by digest: the digest of an unknown token reveals nothing
	// about known ones.
	if edge, ok := s.edges[h]; ok {
		return Principal{Kind: KindEdge, Edge: edge}, nil
	}
	return Principal{}, ErrUnauthenticated
}

// HasAPIToken reports whether service access is configured.
func (s *Static) HasAPIToken() bool { return s.api != nil }

// BearerToken extracts the token of an "Authorization: Bearer …" header.
func BearerToken(header string) string {
	const p = "bearer "
	if len(header) > len(p) && strings.EqualFold(header[:len(p)], p) {
		return strings.TrimSpace(header[len(p):])
	}
	return ""
}
