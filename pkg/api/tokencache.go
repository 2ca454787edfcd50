package api

import (
	"strings"
	"time"

	"github.com/hashicorp/golang-lru/v2/expirable"

	"github.com/outpost-edge/outpost/pkg/auth"
)

// Both caches are expirable LRUs bounded by size and ttl. The LRU expires
// entries by the wall clock; each entry also carries its deadline by the
// server's clock (Config.Now), which get checks, so an injected clock and a
// token's own expiry are honoured too. (The library's sweeper goroutine,
// one per cache, runs for the life of the process: golang-lru v2 has no
// way to stop it.)

// tokenCache remembers access tokens this server verified, so that a client
// sending the same token many times pays for one Ed25519 verification (about
// 45 µs, otherwise the largest cost of a read) per ttl rather than one per
// request. Entries are keyed by the exact token text, so a cached entry can
// only ever vouch for bytes that did verify; an entry lives until the token
// expires or ttl passes, whichever comes first. ttl bounds how long a token
// signed by a key that stopped being trusted (SetTrusted dropping it) keeps
// working here.
type tokenCache struct {
	ttl time.Duration
	now func() time.Time
	m   *expirable.LRU[string, cachedToken]
}

type cachedToken struct {
	claims auth.Claims
	until  time.Time
}

// maxCachedTokenLen keeps unusually long tokens out of the cache.
const maxCachedTokenLen = 2048

func newTokenCache(ttl time.Duration, max int, now func() time.Time) *tokenCache {
	if ttl <= 0 || max <= 0 {
		return nil
	}
	return &tokenCache{ttl: ttl, now: now, m: expirable.NewLRU[string, cachedToken](max, nil, ttl)}
}

func (c *tokenCache) get(tok string) (auth.Claims, bool) {
	if c == nil {
		return auth.Claims{}, false
	}
	e, ok := c.m.Get(tok)
	if !ok || !c.now().Before(e.until) {
		return auth.Claims{}, false
	}
	return e.claims, true
}

// put caches claims verified just now for tok. tok may alias a request
// buffer; it is copied.
func (c *tokenCache) put(tok string, claims auth.Claims) {
	if c == nil || len(tok) > maxCachedTokenLen {
		return
	}
	until := c.now().Add(c.ttl)
	if claims.ExpiresAt.Before(until) {
		until = claims.ExpiresAt
	}
	c.m.Add(strings.Clone(tok), cachedToken{claims: claims, until: until})
}

// userCache remembers users' roles and regions for a short ttl, so that a
// burst of requests by one user reads the store once. The API's own role
// writes drop the entry at once; writes that reach the store another way
// (sync from the cloud) take effect here within ttl.
type userCache struct {
	ttl time.Duration
	now func() time.Time
	m   *expirable.LRU[string, cachedUser]
}

type cachedUser struct {
	roles, regions []string // shared read-only between requests
	until          time.Time
}

func newUserCache(ttl time.Duration, max int, now func() time.Time) *userCache {
	if ttl <= 0 || max <= 0 {
		return nil
	}
	return &userCache{ttl: ttl, now: now, m: expirable.NewLRU[string, cachedUser](max, nil, ttl)}
}

func (c *userCache) get(openid string) (cachedUser, bool) {
	if c == nil {
		return cachedUser{}, false
	}
	e, ok := c.m.Get(openid)
	if !ok || !c.now().Before(e.until) {
		return cachedUser{}, false
	}
	return e, true
}

func (c *userCache) put(openid string, roles, regions []string) {
	if c == nil {
		return
	}
	c.m.Add(strings.Clone(openid), cachedUser{roles: roles, regions: regions, until: c.now().Add(c.ttl)})
}

func (c *userCache) forget(openid string) {
	if c == nil {
		return
	}
	c.m.Remove(openid)
}
