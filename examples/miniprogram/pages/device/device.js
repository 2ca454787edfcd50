// One device: the last hour of one metric as a line chart, extended live
// from the edge's MQTT-over-WebSocket feed, and a fan switch that writes
// desired state. Query: id, and optionally metric (default: the first by name).
const app = getApp()
const { drawLine } = require('../../lib/chart')

const MAX_POINTS = 120
const W = 300
const H = 150

function points (readings, metric) {
  const out = []
  for (const r of readings) {
    const v = r.metrics && r.metrics[metric]
    if (typeof v === 'number') out.push({ ts: typeof r.ts === 'number' ? r.ts : Date.parse(r.ts) || Date.now(), v })
  }
  return out
}

Page({
  data: { id: '', metric: '', latest: null, points: [], online: false, desired: {}, reported: {}, error: '' },

  async onLoad (query) {
    const id = decodeURIComponent(query.id || '')
    this.setData({ id, metric: query.metric ? decodeURIComponent(query.metric) : '' })
    try {
      await app.ready
      const [dev, page] = await Promise.all([
        app.client.device(id),
        app.client.readings(id, { from: Date.now() - 3600 * 1000, limit: 500 })
      ])
      const last = page.items[page.items.length - 1]
      const metric = this.data.metric || (last ? Object.keys(last.metrics).sort()[0] : '')
      this.setData({
        metric,
        latest: last || null,
        points: points(page.items, metric).slice(-MAX_POINTS),
        online: !!dev.online,
        desired: dev.desired || {},
        reported: dev.reported || {}
      })
      this.draw()
    } catch (err) {
      this.setData({ error: `${err.message} (${err.code})` })
    }
    this.feed = app.client.live(id, (m) => this.onLive(m))
  },

  onUnload () {
    if (this.feed) this.feed.close()
  },

  onLive (m) {
    if (m.kind === 'telemetry') {
      const readings = Array.isArray(m.data) ? m.data : [m.data]
      const metric = this.data.metric || Object.keys(readings[0].metrics || {}).sort()[0] || ''
      const more = points(readings.map((r) => ({ ts: r.ts == null ? Date.now() : r.ts, metrics: r.metrics })), metric)
      this.setData({ metric, latest: readings[readings.length - 1], points: this.data.points.concat(more).slice(-MAX_POINTS) })
      this.draw()
    } else if (m.kind === 'desired') {
      this.setData({ desired: (m.data && m.data.state) || {} })
    } else if (m.kind === 'state') {
      this.setData({ reported: Object.assign({}, this.data.reported, m.data && m.data.state) })
    }
  },

  draw () {
    this.chart = drawLine(wx.createCanvasContext('chart', this), this.data.points, W, H)
  },

  async toggleFan () {
    const fan = this.data.desired.fan === 'on' ? 'off' : 'on'
    try {
      await app.client.setDesired(this.data.id, { fan })
      this.setData({ desired: Object.assign({}, this.data.desired, { fan }) })
    } catch (err) {
      this.setData({ error: `${err.message} (${err.code})` })
    }
  }
})
