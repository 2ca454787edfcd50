'use strict'
// A small MQTT 3.1.1 client for the live feed: CONNECT, SUBSCRIBE and
// UNSUBSCRIBE, PUBLISH at QoS 0 and 1 both ways, PINGREQ keepalive, and
// reconnection with backoff. It is bundled rather than mqtt.js because the
// SDK has no runtime dependencies, a phone only ever needs this subset, and
// it runs over any socket with the platform shape (wx.connectSocket's
// SocketTask, the Node platform's WebSocket, or a raw TCP socket in tests).
//
// The owner of a client is whoever called connect(); close() stops every
// timer and the socket, after which the client never reconnects.

const te = typeof TextEncoder !== 'undefined' ? new TextEncoder() : null
const td = typeof TextDecoder !== 'undefined' ? new TextDecoder() : null

function utf8 (s) {
  if (te) return te.encode(s)
  // Mini-program runtimes without TextEncoder.
  const out = []
  const str = unescape(encodeURIComponent(s))
  for (let i = 0; i < str.length; i++) out.push(str.charCodeAt(i))
  return new Uint8Array(out)
}

function fromUtf8 (b) {
  if (td) return td.decode(b)
  let s = ''
  for (let i = 0; i < b.length; i++) s += String.fromCharCode(b[i])
  return decodeURIComponent(escape(s))
}

function str (s) {
  const b = utf8(s)
  const out = new Uint8Array(2 + b.length)
  out[0] = b.length >> 8
  out[1] = b.length & 0xff
  out.set(b, 2)
  return out
}

function u16 (n) { return new Uint8Array([n >> 8, n & 0xff]) }

function concat (parts) {
  let n = 0
  for (const p of parts) n += p.length
  const out = new Uint8Array(n)
  let o = 0
  for (const p of parts) { out.set(p, o); o += p.length }
  return out
}

// packet builds a control packet: fixed header byte, remaining length, body.
function packet (first, parts) {
  const body = concat(parts)
  const len = []
  let n = body.length
  do {
    let d = n % 128
    n = Math.floor(n / 128)
    if (n > 0) d |= 0x80
    len.push(d)
  } while (n > 0)
  return concat([new Uint8Array([first]), new Uint8Array(len), body])
}

const encode = {
  connect ({ clientId, username, password, keepalive, clean }) {
    let flags = clean === false ? 0 : 0x02
    const payload = [str(clientId)]
    if (username != null) { flags |= 0x80; payload.push(str(username)) }
    if (password != null) { flags |= 0x40; payload.push(str(password)) }
    return packet(0x10, [str('MQTT'), new Uint8Array([4, flags]), u16(keepalive), ...payload])
  },
  subscribe (id, filters) {
    const parts = [u16(id)]
    for (const f of filters) parts.push(str(f.topic), new Uint8Array([f.qos]))
    return packet(0x82, parts)
  },
  unsubscribe (id, topics) { return packet(0xa2, [u16(id), ...topics.map(str)]) },
  publish ({ topic, payload, qos, retain, id }) {
    const parts = [str(topic)]
    if (qos > 0) parts.push(u16(id))
    parts.push(typeof payload === 'string' ? utf8(payload) : payload)
    return packet(0x30 | (qos << 1) | (retain ? 1 : 0), parts)
  },
  puback (id) { return packet(0x40, [u16(id)]) },
  pingreq () { return new Uint8Array([0xc0, 0]) },
  disconnect () { return new Uint8Array([0xe0, 0]) }
}

// Parser accumulates a byte stream and yields whole packets.
class Parser {
  constructor () { this.buf = new Uint8Array(0) }
  push (chunk) {
    this.buf = this.buf.length ? concat([this.buf, chunk]) : chunk
    const out = []
    for (;;) {
      const b = this.buf
      if (b.length < 2) break
      let len = 0; let mul = 1; let i = 1; let done = false
      for (; i < b.length && i <= 4; i++) {
        len += (b[i] & 0x7f) * mul
        mul *= 128
        if ((b[i] & 0x80) === 0) { done = true; i++; break }
      }
      if (!done) {
        if (i > 4) throw new Error('mqtt: malformed remaining length')
        break
      }
      if (b.length < i + len) break
      out.push({ type: b[0] >> 4, flags: b[0] & 0x0f, body: b.subarray(i, i + len) })
      this.buf = b.subarray(i + len)
    }
    return out
  }
}

function decodePublish (flags, body) {
  const tlen = (body[0] << 8) | body[1]
  const topic = fromUtf8(body.subarray(2, 2 + tlen))
  const qos = (flags >> 1) & 3
  let o = 2 + tlen
  let id = 0
  if (qos > 0) { id = (body[o] << 8) | body[o + 1]; o += 2 }
  return { topic, qos, retain: (flags & 1) === 1, id, payload: body.subarray(o) }
}

const CONNACK_REASONS = {
  1: 'unacceptable protocol version',
  2: 'client identifier rejected',
  3: 'server unavailable',
  4: 'bad user name or password',
  5: 'not authorized'
}

// MqttClient keeps one session up. options:
//   open(): socket (platform shape: send, close, onOpen, onMessage, onClose, onError)
//   credentials(): Promise<{username, password}> asked before every connect,
//     so a refreshed token is used on reconnection
//   clientId, keepalive (s, default 30), backoff {min, max} ms
//   onMessage({topic, payload, qos, retain}), onConnect(), onDisconnect(err),
//   onSuback(topics, codes) after every SUBSCRIBE (resubscriptions too),
//   onRefused(rc) (CONNACK failure; may return a promise awaited before retry)
class MqttClient {
  constructor (options) {
    this.o = Object.assign({ keepalive: 30, backoff: { min: 200, max: 10000 } }, options)
    this.clientId = this.o.clientId || 'op-' + Math.random().toString(36).slice(2, 12)
    this.subs = new Map() // topic -> qos, resubscribed on every connect
    this.nextId = 1
    this.pending = new Map() // packet id -> {resolve, reject}
    this.closed = false
    this.connected = false
    this.attempt = 0
    this.connects = 0
    this.sock = null
    this.timers = new Set()
  }

  connect () { this._dial(); return this }

  _timer (fn, ms) {
    const t = setTimeout(() => { this.timers.delete(t); fn() }, ms)
    this.timers.add(t)
    return t
  }

  _clearTimers () { for (const t of this.timers) clearTimeout(t); this.timers.clear(); clearInterval(this.ping) }

  async _dial () {
    if (this.closed) return
    let cred
    try {
      cred = this.o.credentials ? await this.o.credentials() : {}
    } catch (err) {
      return this._lost(err)
    }
    if (this.closed) return
    let sock
    try {
      sock = this.o.open()
    } catch (err) {
      return this._lost(err)
    }
    this.sock = sock
    const parser = new Parser()
    let gone = false
    const lost = (err) => {
      if (gone || this.sock !== sock) return
      gone = true
      this._lost(err)
    }
    sock.onOpen(() => {
      if (this.sock !== sock) return
      this._send(encode.connect({
        clientId: this.clientId,
        username: cred.username,
        password: cred.password,
        keepalive: this.o.keepalive
      }))
    })
    sock.onMessage((data) => {
      if (this.sock !== sock) return
      this.lastRx = Date.now()
      let packets
      try {
        packets = parser.push(data instanceof Uint8Array ? data : new Uint8Array(data))
      } catch (err) {
        sock.close()
        return lost(err)
      }
      for (const p of packets) this._handle(p, sock, lost)
    })
    sock.onClose(() => lost(new Error('mqtt: connection closed')))
    sock.onError((err) => lost(err instanceof Error ? err : new Error('mqtt: socket error: ' + (err && err.errMsg || err))))
  }

  _handle (p, sock, lost) {
    switch (p.type) {
      case 2: { // CONNACK
        const rc = p.body[1]
        if (rc !== 0) {
          const err = new Error('mqtt: connection refused: ' + (CONNACK_REASONS[rc] || 'code ' + rc))
          err.rc = rc
          this.refused = rc
          sock.close()
          return lost(err)
        }
        this.connected = true
        this.attempt = 0
        this.connects++
        this.lastRx = Date.now()
        const ka = this.o.keepalive * 1000
        if (ka > 0) {
          this.ping = setInterval(() => {
            // Nothing heard for 1.5 keepalives: the link is dead.
            if (Date.now() - this.lastRx > ka * 1.5) { sock.close(); return lost(new Error('mqtt: keepalive timeout')) }
            this._send(encode.pingreq())
          }, ka / 2)
        }
        if (this.subs.size) this._subscribe([...this.subs].map(([topic, qos]) => ({ topic, qos }))).catch(() => {})
        if (this.o.onConnect) this.o.onConnect()
        return
      }
      case 3: { // PUBLISH
        const m = decodePublish(p.flags, p.body)
        if (m.qos === 1) this._send(encode.puback(m.id))
        if (this.o.onMessage) this.o.onMessage(m)
        return
      }
      case 4: case 9: case 11: { // PUBACK, SUBACK, UNSUBACK
        const id = (p.body[0] << 8) | p.body[1]
        const w = this.pending.get(id)
        if (w) { this.pending.delete(id); w.resolve(Array.from(p.body.subarray(2))) }
        return
      }
      default: // PINGRESP and anything else: lastRx is enough
    }
  }

  _lost (err) {
    const was = this.connected
    this.connected = false
    this.sock = null
    this._clearTimers()
    for (const w of this.pending.values()) w.reject(err)
    this.pending.clear()
    if (was && this.o.onDisconnect) this.o.onDisconnect(err)
    if (this.closed) return
    const rc = this.refused
    this.refused = 0
    const wait = Promise.resolve(rc && this.o.onRefused ? this.o.onRefused(rc, err) : null).catch(() => {})
    const b = this.o.backoff
    const delay = Math.min(b.max, b.min * Math.pow(2, this.attempt++)) * (0.5 + Math.random() / 2)
    wait.then(() => this._timer(() => this._dial(), delay))
  }

  _send (bytes) {
    if (this.sock) this.sock.send(bytes)
  }

  _id () {
    const id = this.nextId
    this.nextId = this.nextId % 65535 + 1
    return id
  }

  _await (id) {
    return new Promise((resolve, reject) => this.pending.set(id, { resolve, reject }))
  }

  _subscribe (filters) {
    const id = this._id()
    const p = this._await(id)
    this._send(encode.subscribe(id, filters))
    if (this.o.onSuback) p.then((codes) => this.o.onSuback(filters.map((f) => f.topic), codes), () => {})
    return p
  }

  // subscribe remembers the filters (resubscribed on reconnection) and, when
  // connected, resolves with the SUBACK return codes (0x80: refused).
  subscribe (topics, qos = 0) {
    const filters = [].concat(topics).map(topic => ({ topic, qos }))
    for (const f of filters) this.subs.set(f.topic, f.qos)
    if (!this.connected) return Promise.resolve(null)
    return this._subscribe(filters)
  }

  unsubscribe (topics) {
    topics = [].concat(topics)
    for (const t of topics) this.subs.delete(t)
    if (!this.connected) return Promise.resolve(null)
    const id = this._id()
    const p = this._await(id)
    this._send(encode.unsubscribe(id, topics))
    return p
  }

  // publish sends at QoS 0 (resolves at once) or 1 (resolves on PUBACK).
  publish (topic, payload, { qos = 0, retain = false } = {}) {
    if (!this.connected) return Promise.reject(new Error('mqtt: not connected'))
    const id = qos > 0 ? this._id() : 0
    const p = qos > 0 ? this._await(id) : Promise.resolve()
    this._send(encode.publish({ topic, payload, qos, retain, id }))
    return p
  }

  close () {
    if (this.closed) return
    this.closed = true
    const sock = this.sock
    if (sock && this.connected) this._send(encode.disconnect())
    this._clearTimers()
    this.connected = false
    this.sock = null
    for (const w of this.pending.values()) w.reject(new Error('mqtt: closed'))
    this.pending.clear()
    if (sock) sock.close()
  }
}

module.exports = { MqttClient, Parser, encode, decodePublish, utf8, fromUtf8 }
