package api

import (
	"strings"
	"sync"
	"time"

	"github.com/outpost-edge/outpost/pkg/auth"
)

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
	max int
	now func() time.Time

	mu sync.RWMutex
	m  map[string]cachedToken
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
	return &tokenCache{ttl: ttl, max: max, now: now, m: make(map[string]cachedToken, min(max, 1024))}
}

func (c *tokenCache) get(tok string) (auth.Claims, bool) {
	if c == nil {
		return auth.Claims{}, false
	}
	c.mu.RLock()
	e, ok := c.m[tok]
	c.mu.RUnlock()
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
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) >= c.max {
		// Evict expired entries, and if that is not enough an arbitrary
		// eighth: map order is random, so this is random eviction.
		now := c.now()
		drop := max(c.max/8, 1)
		for k, e := range c.m {
			if !now.Before(e.until) {
				delete(c.m, k)
			} else if drop > 0 {
				delete(c.m, k)
				drop--
			}
		}
	}
	c.m[strings.Clone(tok)] = cachedToken{claims: claims, until: until}
}

// userCache remembers users' roles and regions for a short ttl, so that a
// burst of requests by one user reads the store once. The API's own role
// writes drop the entry at once; writes that reach the store another way
// (sync from the cloud) take effect here within ttl.
type userCache struct {
	ttl time.Duration
	max int
	now func() time.Time

	mu sync.RWMutex
	m  map[string]cachedUser
}

type cachedUser struct {
	roles, regions []string // shared read-only between requests
	until          time.Time
}

func newUserCache(ttl time.Duration, max int, now func() time.Time) *userCache {
	if ttl <= 0 || max <= 0 {
		return nil
	}
	return &userCache{ttl: ttl, max: max, now: now, m: make(map[string]cachedUser, min(max, 1024))}
}

func (c *userCache) get(openid string) (cachedUser, bool) {
	if c == nil {
		return cachedUser{}, false
	}
	c.mu.RLock()
	e, ok := c.m[openid]
	c.mu.RUnlock()
	if !ok || !c.now().Before(e.until) {
		return cachedUser{}, false
	}
	return e, true
}

func (c *userCache) put(openid string, roles, regions []string) {
	if c == nil {
		return
	}
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) >= c.max {
		drop := max(c.max/8, 1)
		for k, e := range c.m {
			if !now.Before(e.until) {
				delete(c.m, k)
			} else if drop > 0 {
				delete(c.m, k)
				drop--
			}
		}
	}
	c.m[strings.Clone(openid)] = cachedUser{roles: roles, regions: regions, until: now.Add(c.ttl)}
}

func (c *userCache) forget(openid string) {
	if c == nil {
		return
	}
	c.mu.Lock()
	delete(c.m, openid)
	c.mu.Unlock()
}
