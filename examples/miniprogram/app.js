// The app holds one Outpost client for every page: its token refresh,
// request queue and live connection are shared.
const { createClient } = require('outpost-miniprogram')
const config = require('./config')

App({
  onLaunch () {
    this.client = createClient({
      edges: config.edges && config.edges.length ? config.edges : undefined,
      cloud: config.cloud || undefined,
      location: config.location || undefined
    })
    // A session kept in storage from an earlier launch is used as it is.
    this.ready = this.client.openid
      ? Promise.resolve()
      : this.client.login({ code: config.devCode || undefined })
    this.ready.catch((err) => console.error('outpost login failed:', err.code, err.message))
  }
})
