'use strict'
// The example's page logic against a real edge: the list page shows the
// devices with their newest values, tapping one navigates to the device
// page, which charts its readings and (when the edge serves /mqtt) extends
// the chart from the live feed; the fan switch writes desired state.
const test = require('node:test')
const assert = require('node:assert')
const { install } = require('./harness')
const { needTools, startEdge, waitFor } = require('../../../sdk/miniprogram/test/harness')
const { MqttClient } = require('../../../sdk/miniprogram')
const { connectTCP } = require('../../../sdk/miniprogram/node')

test('example mini-program: device list and device page with a live chart', { timeout: 60000 }, async (t) => {
  if (!needTools(t)) return
  const edge = await startEdge(t)
  const pub = new MqttClient({ clientId: 'ex-dev', open: () => connectTCP({ host: '127.0.0.1', port: edge.mqttPort }) }).connect()
  t.after(() => pub.close())
  await waitFor('device connected', () => pub.connected, 10000)
  const t0 = Date.now() - 60000
  for (let i = 0; i < 6; i++) {
    await pub.publish('sensors/ex-1/telemetry', JSON.stringify({ ts: t0 + i * 5000, id: 'x' + i, metrics: { temp: 20 + i, hum: 40 } }), { qos: 1 })
  }

  const rt = install({ loginCode: 'dev:admin' })
  require('../config').edges = [edge.url]
  const app = rt.launch()
  t.after(() => app.client.close())
  await app.ready

  // The list page: one request, each device with its newest values.
  const list = await waitFor('list shows ex-1 with its newest reading', async () => {
    const p = rt.open('pages/devices/devices')
    await p.loaded
    const row = p.data.items.find((d) => d.id === 'ex-1')
    return row && row.summary === 'hum 40 · temp 25' && p
  })
  assert.strictEqual(list.data.error, '')
  assert.strictEqual(list.data.stale, false)
  assert.strictEqual(list.data.loading, false)

  list.open({ currentTarget: { dataset: { id: 'ex-1' } } })
  assert.deepStrictEqual(rt.navigations, ['/pages/device/device?id=ex-1'])

  // The device page: its history as a line, drawn by hand on the canvas.
  const first = rt.open('pages/device/device', { id: 'ex-1' })
  await first.loaded
  assert.strictEqual(first.data.error, '')
  assert.strictEqual(first.data.metric, 'hum', 'the first metric by name')
  first.onUnload()
  const page = rt.open('pages/device/device', { id: 'ex-1', metric: 'temp' })
  await page.loaded
  assert.strictEqual(page.data.error, '')
  assert.deepStrictEqual(page.data.points.map((p) => p.v), [20, 21, 22, 23, 24, 25])
  const canvas = rt.canvases[rt.canvases.length - 1]
  assert.strictEqual(canvas.id, 'chart')
  assert.strictEqual(canvas.calls.filter((c) => c[0] === 'lineTo').length, 5, 'one segment between each pair of points')
  assert.deepStrictEqual(canvas.calls[canvas.calls.length - 1], ['draw'])
  // Rising values: each point is drawn higher (smaller y) than the last.
  assert.ok(page.chart.every((xy, i) => i === 0 || xy[1] < page.chart[i - 1][1]), JSON.stringify(page.chart))

  await page.toggleFan()
  assert.strictEqual(page.data.desired.fan, 'on')
  assert.strictEqual(page.data.error, '')
  assert.strictEqual((await app.client.device('ex-1')).desired.fan, 'on', 'the switch wrote desired state at the edge')

  await waitFor('live feed connected', () => app.client.mqtt && app.client.mqtt.connected, 10000)
  let n = 0
  await waitFor('a live reading extends the chart', async () => {
    await pub.publish('sensors/ex-1/telemetry', JSON.stringify({ ts: Date.now(), id: 'live' + n++, metrics: { temp: 99 } }), { qos: 1 })
    return page.data.points.some((p) => p.v === 99)
  }, 10000, 200)
  const drawn = rt.canvases[rt.canvases.length - 1]
  assert.ok(drawn.calls.filter((c) => c[0] === 'lineTo').length >= 6)
  assert.strictEqual(page.data.latest.metrics.temp, 99)
  page.onUnload()
  assert.strictEqual(app.client.mqtt, null, 'leaving the page closes the live connection')

  // Offline: the list page shows the last list seen, marked stale.
  await edge.kill()
  const offline = rt.open('pages/devices/devices')
  await offline.loaded
  assert.strictEqual(offline.data.stale, true)
  assert.strictEqual(offline.data.error, '')
  assert.ok(offline.data.items.some((d) => d.id === 'ex-1'))
})
