'use strict'
// Nearest-edge choice and failover against a real one-node cloud-sync with
// two joined edges: the client picks the nearest edge from the cloud's
// directory, and when that edge is killed mid-session its requests go to
// the next edge, then to the cloud.
const test = require('node:test')
const assert = require('node:assert')
const { createClient, MqttClient } = require('..')
const { nodePlatform, connectTCP } = require('../node')
const { needTools, startEdge, startCloud, edgeToken, waitFor, api } = require('./harness')

test('nearest edge, then failover to the next edge and the cloud when edges die', async (t) => {
  if (!needTools(t)) return
  const cloud = await startCloud(t, { edges: ['e0', 'e1'] })
  // The edges forward logins to the cloud (no dev login of their own), so
  // the session's tokens verify at both edges and at the cloud.
  const join = (id, loc) => ['-cloud', cloud.url, '-cloud-token', edgeToken(id), '-location', loc]
  const [e0, e1] = await Promise.all([
    startEdge(t, { id: 'e0', devLogin: false, args: join('e0', '31.2304,121.4737') }), // Shanghai
    startEdge(t, { id: 'e1', devLogin: false, args: join('e1', '39.9042,116.4074') }) // Beijing
  ])

  const platform = nodePlatform({ loginCode: 'dev:admin' })
  const client = createClient({ cloud: cloud.url, location: { lat: 31.3, lng: 121.5 }, platform })
  await client.login()
  const token = client.tokens.access_token

  // The directory fills as the edges heartbeat; nearest first.
  const items = await waitFor('both edges in the cloud directory', async () => {
    const its = await client.nearest({ lat: 31.3, lng: 121.5 })
    return its.length === 2 && its
  }, 30000, 200)
  assert.deepStrictEqual(items.map((e) => e.id), ['e0', 'e1'])
  assert.deepStrictEqual(client.targets(), [e0.url, e1.url, cloud.url])

  // A device reports at e0 and reaches the cloud; the cloud's keys reach e1.
  const pub = new MqttClient({ clientId: 'dev-f', open: () => connectTCP({ host: '127.0.0.1', port: e0.mqttPort }) }).connect()
  t.after(() => pub.close())
  await waitFor('device connected', () => pub.connected, 10000)
  await pub.publish('sensors/sdk-f/telemetry', JSON.stringify({ ts: Date.now(), metrics: { temp: 21.5 } }), { qos: 1 })
  await waitFor('reading at the cloud', async () => (await api(cloud.url, 'GET', '/api/v1/devices/sdk-f', { token })).status === 200, 30000, 200)
  await waitFor('e1 accepts the cloud session', async () => (await api(e1.url, 'GET', '/api/v1/devices', { token })).status === 200, 30000, 200)

  const d0 = await client.device('sdk-f')
  assert.strictEqual(d0.id, 'sdk-f')
  assert.strictEqual(client.current, e0.url, 'served by the nearest edge')

  // The live feed follows the REST calls to the next edge.
  const live = client.live('sdk-f', () => {})
  t.after(() => live.close())
  await waitFor('live feed on e0', () => live.connected && client.liveBase === e0.url, 10000)

  await e0.kill()
  await waitFor('live feed moved to e1', () => live.connected && client.liveBase === e1.url, 20000)
  const list = await client.devices({ limit: 10 })
  assert.ok(Array.isArray(list.items))
  assert.strictEqual(list.stale, undefined, 'a live answer, not the cache')
  assert.strictEqual(client.current, e1.url, 'failed over to the next edge')

  await e1.kill()
  const d2 = await client.device('sdk-f')
  assert.strictEqual(d2.id, 'sdk-f')
  assert.strictEqual(client.current, cloud.url, 'failed over to the cloud')
})
