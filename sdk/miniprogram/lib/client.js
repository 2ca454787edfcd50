'use strict'
// The Outpost client: REST calls with failover and a single-flight token
// refresh, a bounded request queue, an offline cache, and the live feed
// (MQTT over WebSocket at an edge's /mqtt).

const { MqttClient, fromUtf8 } = require('./mqtt')

// OutpostError carries the response envelope's code and message. code is
// the HTTP status the server put in the envelope, or -1 when no server
// answered (network error: offline is then true, as it is for 5xx).
class OutpostError extends Error {
  constructor (code, message, { status = 0, data = null, network = false } = {}) {
    super(message)
    this.name = 'OutpostError'
    this.code = code
    this.status = status
    this.data = data
    this.network = network
    this.offline = network || status >= 500
  }
}

// Semaphore keeps at most n platform requests in flight (WeChat allows 10
// concurrent wx.request calls and fails the 11th).
class Semaphore {
  constructor (n) { this.n = n; this.active = 0; this.waiting = [] }
  // acquire waits for a slot; urgent (the token refresh) goes to the front.
  acquire (urgent) {
    if (this.active < this.n) { this.active++; return Promise.resolve() }
    return new Promise((resolve) => urgent ? this.waiting.unshift(resolve) : this.waiting.push(resolve))
  }
  release () {
    const next = this.waiting.shift()
    if (next) next(); else this.active--
  }
}

const trimSlash = (u) => String(u).replace(/\/+$/, '')

function defaultPlatform () {
  // eslint-disable-next-line no-undef
  const w = typeof wx !== 'undefined' ? wx : undefined
  return require('./wx').wxPlatform(w)
}

class Client {
  constructor (opts = {}) {
    if (!opts.cloud && !(opts.edges && opts.edges.length)) {
      throw new TypeError('createClient: give cloud (a URL) or edges (a list of URLs)')
    }
    this.cloud = opts.cloud ? trimSlash(opts.cloud) : null
    this.configuredEdges = (opts.edges || []).map((e) => trimSlash(typeof e === 'string' ? e : e.url))
    this.nearestEdges = []
    this.platform = opts.platform || defaultPlatform()
    this.location = opts.location || null
    this.timeoutMs = opts.timeoutMs || 10000
    this.downMs = opts.downMs == null ? 30000 : opts.downMs
    this.keepalive = opts.keepalive || 30
    this.prefix = opts.storagePrefix || 'outpost:'
    this.queue = new Semaphore(Math.min(Math.max(1, opts.maxConcurrent || 10), 10))
    this.down = new Map() // base URL -> time it may be preferred again
    this.current = null
    this.refreshing = null
    this.refreshes = 0
    this.mqtt = null
    this.liveSubs = new Map() // device -> Set of callbacks
    this.tokens = this._load('tokens') || null
    // ETags are per session: the same URL may answer differently for
    // another user (policy-filtered), so login and logout forget them.
    this.etags = new Map()
    this.maxEtags = opts.maxEtags || 100
  }

  // --- storage ---
  _load (k) { try { return this.platform.getStorage(this.prefix + k) } catch (_) { return undefined } }
  _save (k, v) { try { this.platform.setStorage(this.prefix + k, v) } catch (_) { /* storage full: a cache miss later */ } }

  // --- targets and failover ---
  targets () {
    const seen = new Set()
    const out = []
    for (const u of [...this.nearestEdges, ...this.configuredEdges, this.cloud]) {
      if (u && !seen.has(u)) { seen.add(u); out.push(u) }
    }
    return out
  }

  // _order is the targets to try: those not recently failed first, in
  // preference order, then the failed ones (so a recovered one is found).
  _order (only) {
    const now = Date.now()
    const all = only ? [only] : this.targets()
    const up = all.filter((u) => !(this.down.get(u) > now))
    return [...up, ...all.filter((u) => !up.includes(u))]
  }

  _markDown (u) { this.down.set(u, Date.now() + this.downMs) }

  // _send holds a queue slot for one platform request. An authenticated
  // request takes the access token only once it has its slot, after any
  // refresh already on the wire (which holds a slot of its own, so waiting
  // for it cannot deadlock): requests queued behind a 401 go out with the
  // new token instead of collecting 401s of their own.
  async _send (req, auth, urgent) {
    await this.queue.acquire(urgent)
    try {
      if (urgent) this.refreshOnWire = this.refreshing
      if (auth) {
        if (this.refreshOnWire) await this.refreshOnWire.catch(() => {})
        auth.used = this._accessToken()
        req = Object.assign({}, req, { headers: Object.assign({}, req.headers, { Authorization: 'Bearer ' + auth.used }) })
      }
      return await this.platform.request(Object.assign({ timeoutMs: this.timeoutMs }, req))
    } finally {
      if (urgent) this.refreshOnWire = null
      this.queue.release()
    }
  }

  // _failover sends one request to the first target that answers below 500.
  // auth (an object) asks for the access token, which _send records in
  // auth.used; urgent marks the refresh.
  async _failover (method, path, { query, body, auth, urgent, only } = {}) {
    const qs = encodeQuery(query)
    const headers = { Accept: 'application/json' }
    if (body !== undefined) headers['Content-Type'] = 'application/json'
    let last = null
    for (const base of this._order(only)) {
      const url = base + path + qs
      // Revalidate what this session read before: a 304 reuses the body.
      const hit = method === 'GET' && auth ? this.etags.get(url) : null
      const h = hit ? Object.assign({ 'If-None-Match': hit.etag }, headers) : headers
      let res
      try {
        res = await this._send({ method, url, headers: h, body }, auth, urgent)
      } catch (err) {
        if (!err.network) throw err
        this._markDown(base)
        last = err
        continue
      }
      if (res.status >= 500) { this._markDown(base); last = res; continue }
      this.down.delete(base)
      this.current = base
      if (hit && res.status === 304) return { status: 200, headers: res.headers, data: JSON.parse(JSON.stringify(hit.data)), notModified: true }
      if (method === 'GET' && auth && res.status === 200 && res.headers && res.headers.etag) this._etag(url, res)
      return res
    }
    if (last && last.status) return last
    throw new OutpostError(-1, (last && last.message) || 'network error: no target reachable', { network: true })
  }

  // _etag remembers a revalidatable answer (at most maxEtags, oldest out).
  _etag (url, res) {
    this.etags.delete(url)
    this.etags.set(url, { etag: res.headers.etag, data: res.data })
    if (this.etags.size > this.maxEtags) this.etags.delete(this.etags.keys().next().value)
  }

  _unwrap (res) {
    const env = res.data && typeof res.data === 'object' ? res.data : null
    if (res.status >= 200 && res.status < 300 && env && env.code === 0) return env.data
    const code = env && typeof env.code === 'number' && env.code !== 0 ? env.code : res.status
    const msg = env && env.message ? env.message : `HTTP ${res.status}`
    throw new OutpostError(code, msg, { status: res.status, data: env ? env.data : null })
  }

  // _call is an authenticated API call: on 401 it refreshes (once for all
  // callers holding the same token) and retries once.
  async _call (method, path, opts = {}) {
    this._accessToken() // not logged in: fail before queueing
    for (let attempt = 0; ; attempt++) {
      const auth = {}
      const res = await this._failover(method, path, Object.assign({}, opts, { auth }))
      if (res.status === 401 && attempt === 0 && this.tokens && this.tokens.refresh_token) {
        await this._refresh(auth.used)
        continue
      }
      return this._unwrap(res)
    }
  }

  _accessToken () {
    if (!this.tokens || !this.tokens.access_token) throw new OutpostError(401, 'not logged in: call client.login() first', { status: 401 })
    return this.tokens.access_token
  }

  _setTokens (pair) {
    const t = Object.assign({}, this.tokens, pair)
    if (pair.expires_in) t.expires_at = Date.now() + pair.expires_in * 1000
    if (!t.openid && this.tokens) t.openid = this.tokens.openid
    this.tokens = t
    this._save('tokens', t)
  }

  // _refresh makes sure the token `used` is replaced: if another caller
  // already refreshed it, nothing is sent; if a refresh is in flight, it is
  // awaited; otherwise this caller sends the one POST /auth/refresh.
  _refresh (used) {
    if (this.tokens && used && this.tokens.access_token !== used) return Promise.resolve()
    if (this.refreshing) return this.refreshing
    const rt = this.tokens && this.tokens.refresh_token
    if (!rt) return Promise.reject(new OutpostError(401, 'not logged in: call client.login() first', { status: 401 }))
    this.refreshes++
    this.refreshing = (async () => {
      const res = await this._failover('POST', '/api/v1/auth/refresh', { body: { refresh_token: rt }, urgent: true })
      try {
        this._setTokens(this._unwrap(res))
      } catch (err) {
        if (err.code === 401) {
          this.tokens = null
          this._save('tokens', null)
        }
        throw err
      }
    })().finally(() => { this.refreshing = null })
    return this.refreshing
  }

  // --- API ---
  async login ({ code } = {}) {
    const c = code || await this.platform.login()
    const res = await this._failover('POST', '/api/v1/auth/login', { body: { code: c } })
    const pair = this._unwrap(res)
    this.etags.clear()
    this._setTokens(pair)
    if (this.cloud && this.location && !this.configuredEdges.length) {
      await this.nearest(this.location).catch(() => {})
    }
    return { openid: pair.openid, expires_in: pair.expires_in }
  }

  logout () {
    this.etags.clear()
    this.tokens = null
    this._save('tokens', null)
  }

  get openid () { return this.tokens ? this.tokens.openid : null }

  // nearest asks the cloud (or, without one, the current edge) for the
  // nearest healthy edges, and sends later requests to them, in that order.
  async nearest ({ lat, lng, limit } = {}) {
    const data = await this._call('GET', '/api/v1/edges/nearest', { query: { lat, lng, limit }, only: this.cloud || undefined })
    const items = (data && data.items) || []
    this.nearestEdges = items.filter((e) => e.healthy !== false && e.url).map((e) => trimSlash(e.url))
    return items
  }

  async devices (opts = {}) {
    const query = { limit: opts.limit, cursor: opts.cursor, include: opts.include }
    const key = 'devices:' + JSON.stringify(query)
    return this._cached(key, () => this._call('GET', '/api/v1/devices', { query }))
  }

  device (id) { return this._call('GET', '/api/v1/devices/' + seg(id)) }

  latest (id) { return this._cached('latest:' + id, () => this._call('GET', '/api/v1/devices/' + seg(id) + '/latest')) }

  readings (id, opts = {}) {
    return this._call('GET', '/api/v1/devices/' + seg(id) + '/readings', {
      query: { metric: opts.metric, from: time(opts.from), to: time(opts.to), limit: opts.limit, cursor: opts.cursor }
    })
  }

  stats (id, opts = {}) {
    return this._call('GET', '/api/v1/devices/' + seg(id) + '/stats', {
      query: { metric: opts.metric, from: time(opts.from), to: time(opts.to), step: opts.step }
    })
  }

  setDesired (id, state) { return this._call('PUT', '/api/v1/devices/' + seg(id) + '/desired', { body: { state } }) }

  alerts (opts = {}) {
    return this._call('GET', '/api/v1/alerts', { query: { state: opts.state, device: opts.device, limit: opts.limit, cursor: opts.cursor } })
  }

  ack (alertId) { return this._call('POST', '/api/v1/alerts/' + seg(alertId) + '/ack', { body: {} }) }

  // _cached returns fresh data and stores it, or, when no target answers
  // (network error or 5xx everywhere), the stored copy marked stale: true.
  async _cached (key, fetchFn) {
    try {
      const data = await fetchFn()
      this._save('cache:' + key, { at: Date.now(), data })
      return data
    } catch (err) {
      if (!err.offline) throw err
      const hit = this._load('cache:' + key)
      if (!hit || hit.data == null) throw err
      return Object.assign({}, hit.data, { stale: true, cached_at: hit.at })
    }
  }

  // --- live feed ---
  // live subscribes to a device's telemetry, state, desired state and alerts
  // over one shared MQTT-over-WebSocket connection (WeChat allows 5 sockets).
  // onError (optional) hears of a subscription the edge refused (SUBACK
  // 0x80: the user may not read the device), as an OutpostError 403. It
  // subscribes at QoS 0: the edge keeps no phone session past its
  // connection, so QoS 1 could redeliver nothing, and would cost a PUBACK
  // from the phone (a socket write here, a read and an inflight entry on
  // the edge) for every message.
  live (id, cb, { onError } = {}) {
    let set = this.liveSubs.get(id)
    const first = !set
    if (!set) { set = new Set(); this.liveSubs.set(id, set) }
    const entry = { cb, onError }
    set.add(entry)
    const mq = this._live()
    if (first) mq.subscribe(liveTopics(id), 0).catch(() => {})
    let closed = false
    return {
      close: () => {
        if (closed) return
        closed = true
        set.delete(entry)
        if (set.size || this.mqtt !== mq) return // client.close() already ended it
        this.liveSubs.delete(id)
        if (!this.liveSubs.size) {
          mq.close()
          this.mqtt = null
        } else {
          mq.unsubscribe(liveTopics(id)).catch(() => {})
        }
      },
      get connected () { return !closed && mq.connected }
    }
  }

  _liveTarget () {
    // Edges serve /mqtt; the cloud does not, so it is the last resort.
    const order = this._order()
    return order.find((u) => u !== this.cloud) || order[0]
  }

  _live () {
    if (this.mqtt) return this.mqtt
    let used = null
    this.mqtt = new MqttClient({
      keepalive: this.keepalive,
      credentials: async () => {
        this._accessToken()
        if (this.tokens.expires_at && this.tokens.expires_at - Date.now() < 5000) await this._refresh(this.tokens.access_token)
        used = this._accessToken()
        return { username: this.tokens.openid || 'phone', password: used }
      },
      open: () => {
        const base = this._liveTarget()
        this.liveBase = base
        const sock = this.platform.connectSocket({ url: base.replace(/^http/, 'ws') + '/mqtt', protocols: ['mqtt'] })
        let opened = false
        sock.onOpen(() => { opened = true })
        sock.onClose(() => { if (!opened) this._markDown(base) })
        return sock
      },
      // Refused as not authorised: the token may have just expired.
      onRefused: (rc) => (rc === 4 || rc === 5) ? this._refresh(used) : null,
      onMessage: (m) => this._dispatch(m),
      onSuback: (topics, codes) => {
        topics.forEach((topic, i) => {
          if (codes[i] !== 0x80) return
          const set = this.liveSubs.get(topic.split('/')[1])
          const err = new OutpostError(403, `live: the edge refused the subscription to ${topic} (no read access, or not a live topic)`, { status: 403 })
          for (const e of set || []) if (e.onError) e.onError(err)
        })
      }
    }).connect()
    return this.mqtt
  }

  _dispatch (m) {
    const p = m.topic.split('/')
    let kind; let device
    if (p[0] === 'sensors' && p.length === 3) { device = p[1]; kind = p[2] } else if (p[0] === 'devices' && p[2] === 'desired') {
      device = p[1]; kind = 'desired'
    } else if (p[0] === 'alerts') { device = p[1]; kind = 'alert' } else return
    const text = fromUtf8(m.payload)
    let data = text
    try { data = JSON.parse(text) } catch (_) { /* deliver the text */ }
    const set = this.liveSubs.get(device)
    if (!set) return
    for (const e of [...set]) {
      try { e.cb({ device, kind, topic: m.topic, data, retain: m.retain }) } catch (_) { /* a callback's bug is its own */ }
    }
  }

  close () {
    if (this.mqtt) this.mqtt.close()
    this.mqtt = null
    this.liveSubs.clear()
  }
}

function liveTopics (id) {
  return [`sensors/${id}/telemetry`, `sensors/${id}/state`, `devices/${id}/desired`, `alerts/${id}`]
}

function seg (s) { return encodeURIComponent(String(s)) }

function time (t) {
  if (t == null) return undefined
  if (t instanceof Date) return t.getTime()
  return t
}

function encodeQuery (q) {
  if (!q) return ''
  const parts = []
  for (const k of Object.keys(q)) {
    if (q[k] === undefined || q[k] === null || q[k] === '') continue
    parts.push(encodeURIComponent(k) + '=' + encodeURIComponent(String(q[k])))
  }
  return parts.length ? '?' + parts.join('&') : ''
}

function createClient (opts) { return new Client(opts) }

module.exports = { createClient, Client, OutpostError, Semaphore }
