// The device list: every device the user may see, with its newest values
// (one request: include=latest), offline from the cache, marked stale.
const app = getApp()

function summary (latest) {
  if (!latest || !latest.metrics) return 'no readings yet'
  return Object.keys(latest.metrics).sort().map((k) => `${k} ${latest.metrics[k]}`).join(' · ')
}

Page({
  data: { items: [], stale: false, error: '', loading: true },

  onLoad () { return this.load() },

  onPullDownRefresh () { return this.load().then(() => wx.stopPullDownRefresh()) },

  async load () {
    try {
      await app.ready
      const page = await app.client.devices({ limit: 50, include: 'latest' })
      this.setData({
        items: page.items.map((d) => ({ id: d.id, online: !!d.online, summary: summary(d.latest) })),
        stale: !!page.stale,
        error: '',
        loading: false
      })
    } catch (err) {
      this.setData({ error: `${err.message} (${err.code})`, loading: false })
    }
  },

  open (e) {
    wx.navigateTo({ url: '/pages/device/device?id=' + encodeURIComponent(e.currentTarget.dataset.id) })
  }
})
