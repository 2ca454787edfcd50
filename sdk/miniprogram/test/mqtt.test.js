'use strict'
// The bundled MQTT 3.1.1 client against a real Mosquitto with a websockets
// listener (and a TCP one for the publisher): QoS 0 and 1 delivery with
// PUBACK, keepalive, and reconnection with resubscription after the broker
// restarts. Mosquitto is missing: skip loudly, or fail under CI=true.
const test = require('node:test')
const assert = require('node:assert')
const fs = require('node:fs')
const path = require('node:path')
const { spawnSync } = require('node:child_process')
const { MqttClient, Parser, encode, decodePublish, fromUtf8 } = require('../lib/mqtt')
const { connectWebSocket, connectTCP } = require('../node')
const { CI, freePort, tmpDir, waitFor, Proc } = require('./harness')

function mosquittoBin () {
  for (const p of ['/usr/sbin/mosquitto', '/usr/bin/mosquitto', '/usr/local/sbin/mosquitto']) if (fs.existsSync(p)) return p
  const r = spawnSync('sh', ['-c', 'command -v mosquitto'], { encoding: 'utf8' })
  return r.status === 0 ? r.stdout.trim() : ''
}

async function startMosquitto (t, dir, ports) {
  const conf = path.join(dir, 'mosquitto.conf')
  fs.writeFileSync(conf, [
    'per_listener_settings false', 'allow_anonymous true', 'persistence false',
    `listener ${ports.ws} 127.0.0.1`, 'protocol websockets',
    `listener ${ports.tcp} 127.0.0.1`, 'protocol mqtt', ''
  ].join('\n'))
  const p = new Proc('mosquitto', mosquittoBin(), ['-c', conf], dir)
  t.after(() => p.kill())
  await waitFor('mosquitto listening', () => new Promise((resolve) => {
    const s = connectTCP({ host: '127.0.0.1', port: ports.tcp })
    s.onOpen(() => { s.close(); resolve(true) })
    s.onError(() => resolve(false))
  }), 10000).catch((err) => { throw new Error(err.message + '\n' + p.tail()) })
  return p
}

function client (opts) {
  return new MqttClient(Object.assign({ backoff: { min: 50, max: 500 } }, opts)).connect()
}

test('codec: remaining length across chunk boundaries', () => {
  const big = encode.publish({ topic: 'a/b', payload: new Uint8Array(300), qos: 1, id: 7 })
  const p = new Parser()
  assert.deepStrictEqual(p.push(big.subarray(0, 2)), [])
  const got = p.push(big.subarray(2))
  assert.strictEqual(got.length, 1)
  assert.strictEqual(got[0].type, 3)
  assert.strictEqual(got[0].body.length, 2 + 3 + 2 + 300)
})

test('codec: several packets in one WebSocket message, in order', () => {
  // The edge writes what a session has queued in one message (MQTT over
  // WebSocket lets a message carry several packets, and one cut across
  // two messages).
  const a = encode.publish({ topic: 'sensors/d1/telemetry', payload: 'a', qos: 0 })
  const b = encode.publish({ topic: 'sensors/d1/state', payload: 'b', qos: 1, id: 9 })
  const c = encode.publish({ topic: 'alerts/d1', payload: 'c', qos: 0 })
  const all = new Uint8Array(a.length + b.length + c.length)
  all.set(a, 0); all.set(b, a.length); all.set(c, a.length + b.length)
  const p = new Parser()
  const cut = a.length + b.length + 3 // c's header and part of its body in the next message
  const got = [...p.push(all.subarray(0, cut)), ...p.push(all.subarray(cut))]
    .map((pk) => { const m = decodePublish(pk.flags, pk.body); return [m.topic, fromUtf8(m.payload), m.qos, m.id] })
  assert.deepStrictEqual(got, [['sensors/d1/telemetry', 'a', 0, 0], ['sensors/d1/state', 'b', 1, 9], ['alerts/d1', 'c', 0, 0]])
})

test('MQTT over WebSocket against Mosquitto', async (t) => {
  if (!mosquittoBin()) {
    const why = 'mosquitto is not installed (apt-get install mosquitto): the MQTT client test needs a real broker'
    if (CI) throw new Error(why)
    console.error('SKIP: ' + why)
    return t.skip(why)
  }
  const dir = tmpDir(t, 'outpost-sdk-mosq-')
  const ports = { ws: await freePort(), tcp: await freePort() }
  let broker = await startMosquitto(t, dir, ports)

  const got = []
  const sub = client({
    keepalive: 2,
    open: () => connectWebSocket(`ws://127.0.0.1:${ports.ws}/mqtt`, { protocols: ['mqtt'] }),
    credentials: async () => ({ username: 'phone', password: 'secret' }),
    onMessage: (m) => got.push({ topic: m.topic, qos: m.qos, text: Buffer.from(m.payload).toString() })
  })
  t.after(() => sub.close())
  const pub = client({ open: () => connectTCP({ host: '127.0.0.1', port: ports.tcp }) })
  t.after(() => pub.close())
  await waitFor('both connected', () => sub.connected && pub.connected)
  const codes = await sub.subscribe(['sensors/d1/telemetry', 'alerts/d1'], 1)
  assert.deepStrictEqual(codes, [1, 1], 'SUBACK grants QoS 1')

  await pub.publish('sensors/d1/telemetry', '{"metrics":{"t":1}}', { qos: 1 }) // resolves on PUBACK
  await pub.publish('alerts/d1', 'zero', { qos: 0 })
  await waitFor('two messages', () => got.length >= 2, 5000)
  assert.deepStrictEqual(got.map((m) => [m.topic, m.qos]), [['sensors/d1/telemetry', 1], ['alerts/d1', 0]])

  // Keepalive 2 s: Mosquitto drops a silent client after 3 s. Still the
  // same session (no reconnection) after 4.5 s proves PINGREQ is sent.
  const before = sub.connects
  await new Promise((resolve) => setTimeout(resolve, 4500))
  assert.strictEqual(sub.connects, before, 'no reconnection while idle: keepalive works')
  assert.ok(sub.connected)

  // The broker restarts on the same ports: the client reconnects with
  // backoff and resubscribes by itself.
  await broker.kill()
  await waitFor('client noticed', () => !sub.connected, 5000)
  broker = await startMosquitto(t, dir, ports)
  await waitFor('reconnected', () => sub.connected && pub.connected && sub.connects > before, 10000)
  got.length = 0
  await waitFor('delivery after reconnection', async () => {
    await pub.publish('sensors/d1/telemetry', 'again', { qos: 1 })
    return got.some((m) => m.text === 'again')
  }, 10000, 200)
})
