package broker

import (
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/golang-lru/v2/expirable"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/hooks/storage"
	"github.com/mochi-mqtt/server/v2/packets"
	"golang.org/x/crypto/bcrypt"
)

// Topic namespaces only the edge itself publishes to, in every mode: the
// desired-state downlink (devices/{id}/desired) and alerts (alerts/{id}),
// and the phones' live mirror (livePrefix, fanout.go).
const (
	devicesPrefix = "devices/"
	alertsPrefix  = "alerts/"
)

func edgeOnly(topic string) bool {
	return strings.HasPrefix(topic, devicesPrefix) || strings.HasPrefix(topic, alertsPrefix) || strings.HasPrefix(topic, livePrefix)
}

// LoginLimits bound the cost of failed logins (finding 9). Each remote IP
// and each username has a token bucket of failed logins: a password check
// takes a token from both (an empty bucket refuses the attempt without a
// check), and a successful check gives them back, so only failures use
// them up and a fleet reconnecting from one address is not throttled. Every
// bcrypt comparison holds one of Concurrency slots, so guesses cannot take
// every core from the rest of the edge, and one address has at most one
// comparison running or waiting for a slot at a time (its other attempts
// wait behind it), so a burst from one address delays logins from others
// by one comparison at most.
type LoginLimits struct {
	PerAddr     float64       // failed logins per second per remote IP, after the burst
	AddrBurst   int           // failed logins a remote IP may make at once
	PerUser     float64       // failed logins per second per username, after the burst
	UserBurst   int           // failed logins a username may have at once
	Concurrency int           // concurrent bcrypt comparisons
	Wait        time.Duration // longest wait for a bcrypt slot before refusing
	Tracked     int           // addresses and usernames remembered (LRU)
}

// DefaultLoginLimits: twenty failures at once (Paho clients retry a refused
// login once as MQTT 3.1, so ten mistyped passwords), then one each two
// seconds, per address and per username; two bcrypt comparisons at a time
// (one per core of the smallest supported edge).
func DefaultLoginLimits() LoginLimits {
	return LoginLimits{
		PerAddr: 0.5, AddrBurst: 20, PerUser: 0.5, UserBurst: 20,
		Concurrency: 2, Wait: 5 * time.Second, Tracked: 10000,
	}
}

// bucket is a token bucket of failed logins.
type bucket struct {
	mu     sync.Mutex
	tokens float64
	last   time.Time
	rate   float64
	burst  float64
}

// take removes a token if there is one.
func (b *bucket) take(now time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// give returns a token taken for an attempt that did not fail.
func (b *bucket) give() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.tokens = min(b.burst, b.tokens+1)
}

// loginGate throttles failed logins and bounds bcrypt work.
type loginGate struct {
	lim    LoginLimits
	byAddr *expirable.LRU[string, *bucket]
	byUser *expirable.LRU[string, *bucket]
	mu     sync.Mutex // makes get-or-create atomic; guards lanes
	sem    chan struct{}
	lanes  map[string]*lane // per remote IP with a login in progress
}

// lane serialises one address's password checks.
type lane struct {
	ch   chan struct{}
	refs int
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
	ttl := func(r float64, burst int) time.Duration {
		return time.Duration(float64(burst)/r*float64(time.Second)) + time.Minute
	}
	return &loginGate{
		lim:    lim,
		byAddr: expirable.NewLRU[string, *bucket](lim.Tracked, nil, ttl(lim.PerAddr, lim.AddrBurst)),
		byUser: expirable.NewLRU[string, *bucket](lim.Tracked, nil, ttl(lim.PerUser, lim.UserBurst)),
		sem:    make(chan struct{}, lim.Concurrency),
		lanes:  map[string]*lane{},
	}
}

func (g *loginGate) bucket(c *expirable.LRU[string, *bucket], key string, r float64, burst int, now time.Time) *bucket {
	g.mu.Lock()
	defer g.mu.Unlock()
	if b, ok := c.Get(key); ok {
		return b
	}
	b := &bucket{tokens: float64(burst), last: now, rate: r, burst: float64(burst)}
	c.Add(key, b)
	return b
}

// take reserves a failed login for addr and user: false if either has none
// left. On true the caller gives them back with release(true) if the login
// succeeded.
func (g *loginGate) take(addr, user string) (ok bool, release func(success bool)) {
	now := time.Now()
	a := g.bucket(g.byAddr, addr, g.lim.PerAddr, g.lim.AddrBurst, now)
	if !a.take(now) {
		return false, nil
	}
	u := g.bucket(g.byUser, user, g.lim.PerUser, g.lim.UserBurst, now)
	if !u.take(now) {
		a.give()
		return false, nil
	}
	return true, func(success bool) {
		if success {
			a.give()
			u.give()
		}
	}
}

// acquire takes addr's lane, then a bcrypt slot, waiting at most lim.Wait
// in all; release gives both back.
func (g *loginGate) acquire(addr string) (release func(), ok bool) {
	g.mu.Lock()
	l := g.lanes[addr]
	if l == nil {
		l = &lane{ch: make(chan struct{}, 1)}
		g.lanes[addr] = l
	}
	l.refs++
	g.mu.Unlock()
	leave := func() {
		g.mu.Lock()
		if l.refs--; l.refs == 0 {
			delete(g.lanes, addr)
		}
		g.mu.Unlock()
	}
	t := time.NewTimer(g.lim.Wait)
	defer t.Stop()
	select {
	case l.ch <- struct{}{}:
	case <-t.C:
		leave()
		return nil, false
	}
	select {
	case g.sem <- struct{}{}:
	case <-t.C:
		<-l.ch
		leave()
		return nil, false
	}
	return func() {
		<-g.sem
		<-l.ch
		leave()
	}, true
}

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
	if isPhone(cl) {
		return false // phoneHook decides
	}
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
	ok, done := h.gate.take(addr, user)
	if !ok {
		return loginThrottled
	}
	hash, ok := h.service[user]
	if !ok {
		hash, ok = h.creds[user]
	}
	if !ok {
		done(false)
		h.log.Warn("mqtt authentication failed", "username", user, "remote", cl.Net.Remote)
		return loginBadPassword
	}
	release, ok := h.gate.acquire(addr)
	if !ok {
		done(true) // not the client's failure
		h.log.Warn("mqtt authentication refused: too many logins in progress", "username", user, "remote", cl.Net.Remote)
		return loginBusy
	}
	err := bcrypt.CompareHashAndPassword([]byte(hash), password)
	release()
	done(err == nil)
	if err != nil {
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
	if isPhone(cl) {
		return false // phoneHook decides
	}
	user := string(cl.Properties.Username)
	if write {
		return h.mayPublish(user, topic)
	}
	if strings.HasPrefix(topic, livePrefix) {
		return false // the phones' mirror of sensors/ (fanout.go); TCP clients subscribe to sensors/ itself
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
