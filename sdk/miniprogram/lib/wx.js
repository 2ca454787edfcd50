'use strict'
// The WeChat platform: wx.request, wx.connectSocket, wx.getStorageSync /
// wx.setStorageSync and wx.login, adapted to the SDK's platform shape.

function wxPlatform (wx) {
  if (!wx) throw new Error('outpost-miniprogram: no wx global; pass createClient({ platform }) outside a mini-program')
  return {
    name: 'wx',
    request ({ method, url, headers, body, timeoutMs }) {
      return new Promise((resolve, reject) => {
        wx.request({
          url,
          method,
          header: headers,
          data: body,
          dataType: 'json',
          timeout: timeoutMs,
          success: (res) => resolve({ status: res.statusCode, headers: lower(res.header), data: res.data }),
          fail: (err) => {
            const e = new Error('network error: ' + (err && err.errMsg || 'wx.request failed'))
            e.network = true
            reject(e)
          }
        })
      })
    },
    connectSocket ({ url, protocols }) {
      const task = wx.connectSocket({ url, protocols, fail: () => {} })
      return {
        send (data) {
          // wx wants an ArrayBuffer of exactly the bytes.
          const ab = data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength)
          task.send({ data: ab })
        },
        close () { task.close({}) },
        onOpen (cb) { task.onOpen(() => cb()) },
        onMessage (cb) { task.onMessage((m) => cb(typeof m.data === 'string' ? new Uint8Array(0) : new Uint8Array(m.data))) },
        onClose (cb) { task.onClose((r) => cb(r)) },
        onError (cb) { task.onError((e) => cb(new Error('websocket: ' + (e && e.errMsg || 'error')))) }
      }
    },
    getStorage (key) {
      const v = wx.getStorageSync(key)
      return v === '' ? undefined : v
    },
    setStorage (key, value) { wx.setStorageSync(key, value) },
    removeStorage (key) { wx.removeStorageSync ? wx.removeStorageSync(key) : wx.setStorageSync(key, '') },
    login () {
      return new Promise((resolve, reject) => {
        wx.login({
          success: (res) => res.code ? resolve(res.code) : reject(new Error('wx.login returned no code')),
          fail: (err) => reject(new Error('wx.login failed: ' + (err && err.errMsg)))
        })
      })
    }
  }
}

function lower (h) {
  const out = {}
  for (const k of Object.keys(h || {})) out[k.toLowerCase()] = h[k]
  return out
}

module.exports = { wxPlatform }
