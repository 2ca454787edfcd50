'use strict'
// The Node platform: for tests and server-side use of the SDK.
//
//   const { nodePlatform } = require('outpost-miniprogram/node')
//   createClient({ edges: ['http://127.0.0.1:8080'], platform: nodePlatform({ loginCode: 'dev:alice' }) })
//
// HTTP goes through Node's global fetch (Node ≥ 18). WebSocket is a minimal
// RFC 6455 client over node:net / node:tls (binary frames, ping/pong, close),
// because Node 20 has no global WebSocket and the SDK takes no dependencies.

const net = require('node:net')
const tls = require('node:tls')
const crypto = require('node:crypto')

const WS_GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11'

// connectWebSocket opens ws:// or wss:// url and returns a socket of the
// platform shape: send(bytes), close(), onOpen/onMessage/onClose/onError.
function connectWebSocket (url, { protocols = [], headers = {}, timeoutMs = 10000, tlsOptions = {} } = {}) {
  const u = new URL(url)
  const secure = u.protocol === 'wss:'
  const port = Number(u.port) || (secure ? 443 : 80)
  const handlers = { open: [], message: [], close: [], error: [] }
  const emit = (ev, arg) => { for (const h of handlers[ev]) h(arg) }
  let state = 'connecting' // connecting, open, closing, closed
  const key = crypto.randomBytes(16).toString('base64')
  const sock = secure
    ? tls.connect({ host: u.hostname, port, servername: u.hostname, ...tlsOptions })
    : net.connect({ host: u.hostname, port })
  sock.setNoDelay(true)
  const timer = setTimeout(() => fail(new Error('websocket: handshake timed out')), timeoutMs)
  let buf = Buffer.alloc(0)
  let fragments = []

  function fail (err) {
    if (state === 'closed') return
    clearTimeout(timer)
    state = 'closed'
    sock.destroy()
    emit('error', err)
    emit('close', { code: 1006, reason: err.message })
  }

  sock.on(secure ? 'secureConnect' : 'connect', () => {
    const lines = [
      `GET ${u.pathname}${u.search} HTTP/1.1`,
      `Host: ${u.host}`,
      'Upgrade: websocket',
      'Connection: Upgrade',
      `Sec-WebSocket-Key: ${key}`,
      'Sec-WebSocket-Version: 13'
    ]
    if (protocols.length) lines.push('Sec-WebSocket-Protocol: ' + protocols.join(', '))
    for (const [k, v] of Object.entries(headers)) lines.push(`${k}: ${v}`)
    sock.write(lines.join('\r\n') + '\r\n\r\n')
  })
  sock.on('error', fail)
  sock.on('close', () => {
    if (state === 'closed') return
    clearTimeout(timer)
    state = 'closed'
    emit('close', { code: 1006, reason: 'connection closed' })
  })
  sock.on('data', (chunk) => {
    buf = buf.length ? Buffer.concat([buf, chunk]) : chunk
    if (state === 'connecting') {
      const end = buf.indexOf('\r\n\r\n')
      if (end < 0) return
      const head = buf.subarray(0, end).toString('latin1').split('\r\n')
      buf = buf.subarray(end + 4)
      const status = /^HTTP\/1\.1 (\d{3})/.exec(head[0])
      const h = {}
      for (const line of head.slice(1)) {
        const i = line.indexOf(':')
        if (i > 0) h[line.slice(0, i).trim().toLowerCase()] = line.slice(i + 1).trim()
      }
      const accept = crypto.createHash('sha1').update(key + WS_GUID).digest('base64')
      if (!status || status[1] !== '101') return fail(new Error(`websocket: upgrade refused: ${head[0]}`))
      if (h['sec-websocket-accept'] !== accept) return fail(new Error('websocket: bad Sec-WebSocket-Accept'))
      if (protocols.length && !protocols.includes(h['sec-websocket-protocol'])) {
        return fail(new Error(`websocket: server chose no offered subprotocol (${h['sec-websocket-protocol'] || 'none'})`))
      }
      clearTimeout(timer)
      state = 'open'
      emit('open')
    }
    readFrames()
  })

  function readFrames () {
    while (state === 'open' || state === 'closing') {
      if (buf.length < 2) return
      const fin = (buf[0] & 0x80) !== 0
      const op = buf[0] & 0x0f
      const masked = (buf[1] & 0x80) !== 0
      let len = buf[1] & 0x7f
      let o = 2
      if (len === 126) { if (buf.length < 4) return; len = buf.readUInt16BE(2); o = 4 } else if (len === 127) {
        if (buf.length < 10) return
        len = Number(buf.readBigUInt64BE(2)); o = 10
      }
      let mask = null
      if (masked) { if (buf.length < o + 4) return; mask = buf.subarray(o, o + 4); o += 4 }
      if (buf.length < o + len) return
      let payload = Buffer.from(buf.subarray(o, o + len))
      buf = buf.subarray(o + len)
      if (mask) for (let i = 0; i < payload.length; i++) payload[i] ^= mask[i & 3]
      switch (op) {
        case 0x0: case 0x1: case 0x2:
          fragments.push(payload)
          if (fin) {
            payload = fragments.length === 1 ? fragments[0] : Buffer.concat(fragments)
            fragments = []
            emit('message', new Uint8Array(payload.buffer, payload.byteOffset, payload.length))
          }
          break
        case 0x8: // close: echo it and end
          if (state === 'open') writeFrame(0x8, payload.subarray(0, 2))
          state = 'closed'
          sock.end()
          emit('close', { code: payload.length >= 2 ? payload.readUInt16BE(0) : 1005, reason: payload.subarray(2).toString() })
          return
        case 0x9: writeFrame(0xa, payload); break
        default: // pong and reserved opcodes
      }
    }
  }

  function writeFrame (op, data) {
    const payload = Buffer.from(data.buffer ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength) : data)
    const mask = crypto.randomBytes(4)
    let head
    if (payload.length < 126) {
      head = Buffer.from([0x80 | op, 0x80 | payload.length])
    } else if (payload.length < 65536) {
      head = Buffer.alloc(4); head[0] = 0x80 | op; head[1] = 0x80 | 126; head.writeUInt16BE(payload.length, 2)
    } else {
      head = Buffer.alloc(10); head[0] = 0x80 | op; head[1] = 0x80 | 127; head.writeBigUInt64BE(BigInt(payload.length), 2)
    }
    for (let i = 0; i < payload.length; i++) payload[i] ^= mask[i & 3]
    sock.write(Buffer.concat([head, mask, payload]))
  }

  return {
    send (data) {
      if (state !== 'open') return
      writeFrame(0x2, data instanceof ArrayBuffer ? new Uint8Array(data) : data)
    },
    close (code = 1000) {
      if (state === 'open') {
        state = 'closing'
        const b = Buffer.alloc(2); b.writeUInt16BE(code, 0)
        writeFrame(0x8, b)
        // The server answers with its close frame; do not wait long for it.
        setTimeout(() => { if (state !== 'closed') { state = 'closed'; sock.destroy(); emit('close', { code, reason: '' }) } }, 1000).unref()
      } else if (state === 'connecting') {
        fail(new Error('websocket: closed before open'))
      }
    },
    onOpen (cb) { handlers.open.push(cb) },
    onMessage (cb) { handlers.message.push(cb) },
    onClose (cb) { handlers.close.push(cb) },
    onError (cb) { handlers.error.push(cb) }
  }
}

// connectTCP wraps a raw TCP (or TLS) socket in the platform socket shape,
// so the bundled MQTT client can talk to a broker's TCP port (tests, devices).
function connectTCP ({ host, port, tls: useTLS, tlsOptions = {} }) {
  const handlers = { open: [], message: [], close: [], error: [] }
  const emit = (ev, arg) => { for (const h of handlers[ev]) h(arg) }
  const sock = useTLS ? tls.connect({ host, port, ...tlsOptions }) : net.connect({ host, port })
  let closed = false
  sock.on(useTLS ? 'secureConnect' : 'connect', () => emit('open'))
  sock.on('data', (b) => emit('message', new Uint8Array(b.buffer, b.byteOffset, b.length)))
  sock.on('error', (err) => emit('error', err))
  sock.on('close', () => { if (!closed) { closed = true; emit('close', {}) } })
  return {
    send (data) { sock.write(data) },
    close () { sock.destroy() },
    onOpen (cb) { handlers.open.push(cb) },
    onMessage (cb) { handlers.message.push(cb) },
    onClose (cb) { handlers.close.push(cb) },
    onError (cb) { handlers.error.push(cb) }
  }
}

// nodePlatform is the SDK's platform for Node. loginCode is the code login()
// sends (a string, or a function returning one or a promise of one), for
// example "dev:<openid>" against an edge started with -dev-login. storage is
// any object with get(key)/set(key, value) (default: in memory).
function nodePlatform ({ loginCode, storage, timeoutMs = 10000, tlsOptions } = {}) {
  const mem = new Map()
  const store = storage || { get: (k) => mem.get(k), set: (k, v) => mem.set(k, v), remove: (k) => mem.delete(k) }
  return {
    name: 'node',
    async request ({ method, url, headers, body }) {
      let res
      try {
        res = await fetch(url, {
          method,
          headers,
          body: body === undefined ? undefined : JSON.stringify(body),
          signal: AbortSignal.timeout(timeoutMs)
        })
      } catch (err) {
        const e = new Error(`network error: ${err.cause ? err.cause.message || err.cause.code : err.message}`)
        e.network = true
        throw e
      }
      const text = await res.text().catch(() => '')
      let data = text
      try { data = text ? JSON.parse(text) : null } catch (_) { /* not JSON: keep the text */ }
      const h = {}
      res.headers.forEach((v, k) => { h[k] = v })
      return { status: res.status, headers: h, data }
    },
    connectSocket ({ url, protocols }) {
      return connectWebSocket(url, { protocols, timeoutMs, tlsOptions })
    },
    getStorage (key) {
      const v = store.get(key)
      return v === undefined ? undefined : JSON.parse(JSON.stringify(v))
    },
    setStorage (key, value) { store.set(key, JSON.parse(JSON.stringify(value))) },
    removeStorage (key) { if (store.remove) store.remove(key); else store.set(key, undefined) },
    async login () {
      const code = typeof loginCode === 'function' ? await loginCode() : loginCode
      if (!code) throw new Error('nodePlatform: no loginCode given (pass nodePlatform({ loginCode }) or login({ code }))')
      return code
    }
  }
}

module.exports = { nodePlatform, connectWebSocket, connectTCP }
