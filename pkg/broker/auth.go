package broker

import (
	"context"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/hashicorp/golang-lru/v2/expirable"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/storage"
	"github.com/mochi-mqtt/server/v2/packets"
	"golang.org/x/crypto/bcrypt"
	"golang.org/x/time/rate"
)

// Topic namespaces only the edge itself publishes to, in every mode: the
// desired-state downlink (devices/{id}/desired) and alerts (alerts/{id}).
const (
	devicesPrefix = "devices/"
	alertsPrefix  = "alerts/"
)

func edgeOnly(topic string) bool {
	return strings.HasPrefix(topic, devicesPrefix) || strings.HasPrefix(topic, alertsPrefix)
}

// LoginLimits bound the cost of failed logins (finding 9). Failures are
// counted per remote IP and per username in token buckets: an exhausted
// bucket refuses the next attempt without a bcrypt comparison. Every
// bcrypt comparison, failed or not, holds one of Concurrency slots, so
// guesses cannot take every core from the rest of the edge.
type LoginLimits struct {
	PerAddr     rate.Limit    // failed logins per second per remote IP, after the burst
	AddrBurst   int           // failed logins a remote IP may make at once
	PerUser     rate.Limit    // failed logins per second per username, after the burst
	UserBurst   int           // failed logins a username may have at once
	Concurrency int           // concurrent bcrypt comparisons
	Wait        time.Duration // longest wait for a bcrypt slot before refusing
	Tracked     int           // addresses and usernames remembered (LRU)
}

// DefaultLoginLimits: ten failures at once, then one each two seconds, per
// address and per username; two bcrypt comparisons at a time (one per core
// of the smallest supported edge).
func DefaultLoginLimits() LoginLimits {
	return LoginLimits{
		PerAddr: 0.5, AddrBurst: 10, PerUser: 0.5, UserBurst: 10,
		Concurrency: 2, Wait: 5 * time.Second, Tracked: 10000,
	}
}

// loginGate throttles failed logins and bounds bcrypt work.
type loginGate struct {
	lim    LoginLimits
	byAddr *expirable.LRU[string, *rate.Limiter]
	byUser *expirable.LRU[string, *rate.Limiter]
	sem    chan struct{}
}

func newLoginGate(lim LoginLimits) *loginGate {
	def := DefaultLoginLimits()
	if lim.PerAddr <= 0 {
		lim.PerAddr = def.PerAddr
	}
	if lim.AddrBurst <= 0 {
		lim.AddrBurst = def.AddrBurst
	}
	if lim.PerUser <= 0 {
		lim.PerUser = def.PerUser
	}
	if lim.UserBurst <= 0 {
		lim.UserBurst = def.UserBurst
	}
	if lim.Concurrency <= 0 {
		lim.Concurrency = def.Concurrency
	}
	if lim.Wait <= 0 {
		lim.Wait = def.Wait
	}
	if lim.Tracked <= 0 {
		lim.Tracked = def.Tracked
	}
	// An entry idle for longer than its bucket takes to refill carries no
	// information: forgetting it is the same as a full bucket.
	ttl := func(r rate.Limit, burst int) time.Duration {
		return time.Duration(float64(burst)/float64(r)*float64(time.Second)) + time.Minute
	}
	return &loginGate{
		lim:    lim,
		byAddr: expirable.NewLRU[string, *rate.Limiter](lim.Tracked, nil, ttl(lim.PerAddr, lim.AddrBurst)),
		byUser: expirable.NewLRU[string, *rate.Limiter](lim.Tracked, nil, ttl(lim.PerUser, lim.UserBurst)),
		sem:    make(chan struct{}, lim.Concurrency),
	}
}

func limiter(c *expirable.LRU[string, *rate.Limiter], key string, r rate.Limit, burst int, create bool) *rate.Limiter {
	if l, ok := c.Get(key); ok {
		return l
	}
	if !create {
		return nil
	}
	l := rate.NewLimiter(r, burst)
	c.Add(key, l)
	return l
}

// throttled reports whether addr or user has no failed login left.
func (g *loginGate) throttled(addr, user string) bool {
	if l := limiter(g.byAddr, addr, g.lim.PerAddr, g.lim.AddrBurst, false); l != nil && l.Tokens() < 1 {
		return true
	}
	if l := limiter(g.byUser, user, g.lim.PerUser, g.lim.UserBurst, false); l != nil && l.Tokens() < 1 {
		return true
	}
	return false
}

// failed charges a failed login to addr and user.
func (g *loginGate) failed(addr, user string) {
	limiter(g.byAddr, addr, g.lim.PerAddr, g.lim.AddrBurst, true).Allow()
	limiter(g.byUser, user, g.lim.PerUser, g.lim.UserBurst, true).Allow()
}

// acquire takes a bcrypt slot, waiting at most lim.Wait.
func (g *loginGate) acquire() bool {
	ctx, cancel := context.WithTimeout(context.Background(), g.lim.Wait)
	defer cancel()
	select {
	case g.sem <- struct{}{}:
		return true
	case <-ctx.Done():
		return false
	}
}

func (g *loginGate) release() { <-g.sem }

// Login outcomes, the reason label of outpost_mqtt_login_failures_total.
const (
	loginBadPassword = "bad_credentials"
	loginThrottled   = "throttled"
	loginBusy        = "busy"
	loginClientID    = "client_id"
	loginWill        = "will"
)

// authHook authenticates devices, confines them to their own topics and
// holds their Wills to the same rules as their publishes.
//
// Modes: with credentials every client authenticates (a device as its id,
// or a service user); without, the broker is open — to everyone when
// AllowAnonymous says so, else to loopback clients only (the listener
// refuses the rest). In every mode only the edge itself (mochi's inline
// client, which bypasses the ACL) publishes below devices/ and alerts/.
type authHook struct {
	mqtt.HookBase
	creds   map[string]string
	service map[string]string
	gate    *loginGate
	met     *metrics
	log     *slog.Logger
}

func (h *authHook) ID() string { return "outpost-auth" }

func (h *authHook) Provides(b byte) bool {
	return b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck || b == mqtt.OnWill
}

func (h *authHook) open() bool { return len(h.creds) == 0 && len(h.service) == 0 }

func remoteIP(remote string) string {
	if host, _, err := net.SplitHostPort(remote); err == nil {
		return host
	}
	return remote
}

func (h *authHook) OnConnectAuthenticate(cl *mqtt.Client, pk packets.Packet) bool {
	user := string(pk.Connect.Username)
	if !h.open() {
		if reason := h.authenticate(cl, user, pk.Connect.Password); reason != "" {
			h.met.loginFailed(reason)
			return false
		}
		if cid := string(pk.Connect.ClientIdentifier); !h.isService(user) && cid != user && !strings.HasPrefix(cid, user+":") {
			// Persistent sessions are keyed by client id and mochi does
			// not re-check the ACL when it resumes one, so a device using
			// another device's client id could inherit its subscriptions.
			// The client id must be the device id, or the device id, ':'
			// and a suffix (':' cannot occur in device ids, so no device
			// can claim another's).
			h.log.Warn("mqtt client id must equal the device id", "username", user, "client_id", cid)
			h.met.loginFailed(loginClientID)
			return false
		}
	}
	// A Will is a publish the broker makes for the client later: it is held
	// to the client's publish ACL now (finding 4), and never retained, so a
	// client cannot leave a standing message behind.
	if pk.Connect.WillFlag {
		if !h.mayPublish(user, pk.Connect.WillTopic) {
			h.log.Warn("mqtt will refused: the client may not publish to its topic", "username", user,
				"topic", pk.Connect.WillTopic, "remote", cl.Net.Remote)
			h.met.loginFailed(loginWill)
			return false
		}
		cl.Properties.Will.Retain = false
	}
	return true
}

// authenticate checks user's password; it returns "" or why it failed.
func (h *authHook) authenticate(cl *mqtt.Client, user string, password []byte) string {
	addr := remoteIP(cl.Net.Remote)
	if h.gate.throttled(addr, user) {
		return loginThrottled
	}
	hash, ok := h.service[user]
	if !ok {
		hash, ok = h.creds[user]
	}
	if !ok {
		h.gate.failed(addr, user)
		h.log.Warn("mqtt authentication failed", "username", user, "remote", cl.Net.Remote)
		return loginBadPassword
	}
	if !h.gate.acquire() {
		h.log.Warn("mqtt authentication refused: too many logins in progress", "username", user, "remote", cl.Net.Remote)
		return loginBusy
	}
	defer h.gate.release()
	// Checked again with the slot held: the attempts queued behind a
	// burst of failures find the bucket empty and cost nothing.
	if h.gate.throttled(addr, user) {
		return loginThrottled
	}
	if bcrypt.CompareHashAndPassword([]byte(hash), password) != nil {
		h.gate.failed(addr, user)
		h.log.Warn("mqtt authentication failed", "username", user, "remote", cl.Net.Remote)
		return loginBadPassword
	}
	return ""
}

func (h *authHook) isService(user string) bool {
	_, ok := h.service[user]
	return ok
}

// mayPublish is the publish ACL, for publishes and Wills alike.
func (h *authHook) mayPublish(user, topic string) bool {
	if edgeOnly(topic) {
		return false
	}
	if h.open() || h.isService(user) {
		return true
	}
	return strings.HasPrefix(topic, "sensors/"+user+"/")
}

func (h *authHook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if cl.Net.Inline {
		return true
	}
	user := string(cl.Properties.Username)
	if write {
		return h.mayPublish(user, topic)
	}
	if h.open() || h.isService(user) {
		return true
	}
	return strings.HasPrefix(topic, devicesPrefix+user+"/") || topic == alertsPrefix+user
}

// OnWill is the last line for Wills that did not pass OnConnectAuthenticate
// (sessions restored from a state file written by an older edge are
// sanitised in persistHook.StoredClients): never retained.
func (h *authHook) OnWill(_ *mqtt.Client, will mqtt.Will) (mqtt.Will, error) {
	will.Retain = false
	return will, nil
}

// sanitizeWill drops a stored client's Will if its client could not set it
// now, and its retain flag in any case.
func (h *authHook) sanitizeWill(c *storage.Client) {
	if c.Will.Flag == 0 {
		return
	}
	if !h.mayPublish(string(c.Username), c.Will.TopicName) {
		c.Will = storage.ClientWill{}
		return
	}
	c.Will.Retain = false
}
