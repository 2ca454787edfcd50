'use strict'
// The live feed against a real edge's MQTT-over-WebSocket endpoint: a
// device's telemetry and desired state arrive, and when the access token
// expires mid-subscription the edge closes the connection and the client
// reconnects with a refreshed token and resubscribes.
const test = require('node:test')
const assert = require('node:assert')
const { createClient, MqttClient } = require('..')
const { nodePlatform, connectTCP } = require('../node')
const { needTools, startEdge, waitFor } = require('./harness')

test('live feed survives an access token expiring mid-subscription', { timeout: 90000 }, async (t) => {
  if (!needTools(t)) return
  const edge = await startEdge(t, { config: 'auth:\n  access_ttl: 2s\n' })
  const client = createClient({ edges: [edge.url], platform: nodePlatform({ loginCode: 'dev:admin' }), keepalive: 5 })
  t.after(() => client.close())
  await client.login()

  const got = []
  const live = client.live('sdk-l', (m) => got.push(m))
  t.after(() => live.close())
  await waitFor('live feed connected', () => live.connected, 10000)

  const pub = new MqttClient({ clientId: 'dev-l', open: () => connectTCP({ host: '127.0.0.1', port: edge.mqttPort }) }).connect()
  t.after(() => pub.close())
  await waitFor('device connected', () => pub.connected, 10000)
  // Subscriptions are decided when the device exists; publish until one
  // message arrives.
  let n = 0
  const send = () => pub.publish('sensors/sdk-l/telemetry', JSON.stringify({ ts: Date.now(), id: 'l' + (n++), metrics: { temp: n } }), { qos: 1 })
  await waitFor('telemetry over the live feed', async () => { await send(); return got.some((m) => m.kind === 'telemetry') }, 10000, 200)
  const m = got.find((x) => x.kind === 'telemetry')
  assert.strictEqual(m.device, 'sdk-l')
  assert.strictEqual(typeof m.data.metrics.temp, 'number')

  await client.setDesired('sdk-l', { fan: 'on' })
  await waitFor('desired state over the live feed', () => got.some((x) => x.kind === 'desired' && JSON.stringify(x.data).includes('fan')), 10000)

  // The token (2 s, plus the edge's verification leeway) runs out: the edge
  // closes the connection; the client refreshes and reconnects.
  const firstConnects = client.mqtt.connects
  const expiresAt = client.tokens.expires_at
  await waitFor('reconnection after the token expired', () => client.mqtt.connects > firstConnects && live.connected, 60000, 100)
  assert.ok(Date.now() >= expiresAt - 1000, 'the connection lasted until the token expired')
  assert.ok(client.refreshes >= 1, 'the reconnection used a refreshed token')
  got.length = 0
  await waitFor('telemetry after reconnection', async () => { await send(); return got.some((x) => x.kind === 'telemetry') }, 10000, 200)
})

test('live feed: a device the user may not read is refused', { timeout: 60000 }, async (t) => {
  if (!needTools(t)) return
  const edge = await startEdge(t)
  const pub = new MqttClient({ clientId: 'dev-r', open: () => connectTCP({ host: '127.0.0.1', port: edge.mqttPort }) }).connect()
  t.after(() => pub.close())
  await waitFor('device connected', () => pub.connected, 10000)
  await pub.publish('sensors/sdk-r/telemetry', JSON.stringify({ ts: Date.now(), metrics: { temp: 1 } }), { qos: 1 })

  // bob has no role and owns nothing: the edge refuses his subscriptions.
  const client = createClient({ edges: [edge.url], platform: nodePlatform({ loginCode: 'dev:bob' }) })
  t.after(() => client.close())
  await client.login()
  const errors = []
  const got = []
  const live = client.live('sdk-r', (m) => got.push(m), { onError: (err) => errors.push(err) })
  t.after(() => live.close())
  await waitFor('subscription refused', () => errors.length > 0, 10000)
  assert.strictEqual(errors[0].code, 403)
  assert.match(errors[0].message, /sensors\/sdk-r\/telemetry|alerts\/sdk-r|devices\/sdk-r/)
  await pub.publish('sensors/sdk-r/telemetry', JSON.stringify({ ts: Date.now(), metrics: { temp: 2 } }), { qos: 1 })
  assert.strictEqual(got.length, 0, 'nothing delivered')
})
