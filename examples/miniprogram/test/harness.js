'use strict'
// A minimal mini-program runtime for tests: App(), Page(), getApp() and a
// wx global whose request, connectSocket, storage, login, navigateTo and
// canvas are backed by Node (so the SDK's own wx adapter is what runs).
// Page instances record every setData call.
const path = require('node:path')
const Module = require('node:module')
const { nodePlatform, connectWebSocket } = require('../../../sdk/miniprogram/node')

const SDK = path.resolve(__dirname, '../../../sdk/miniprogram/index.js')
const ROOT = path.resolve(__dirname, '..')

function install ({ loginCode }) {
  const node = nodePlatform({})
  const storage = new Map()
  const rt = { app: null, pages: {}, navigations: [], canvases: [] }

  const wx = {
    request ({ url, method, header, data, success, fail }) {
      node.request({ method, url, headers: header, body: data })
        .then((res) => success({ statusCode: res.status, data: res.data, header: res.headers }))
        .catch((err) => fail({ errMsg: 'request:fail ' + err.message }))
    },
    connectSocket ({ url, protocols }) {
      const ws = connectWebSocket(url, { protocols })
      return {
        send ({ data }) { ws.send(new Uint8Array(data)) },
        close () { ws.close() },
        onOpen: (cb) => ws.onOpen(() => cb({})),
        onMessage: (cb) => ws.onMessage((b) => cb({ data: b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength) })),
        onClose: (cb) => ws.onClose((r) => cb(r)),
        onError: (cb) => ws.onError((e) => cb({ errMsg: e.message }))
      }
    },
    getStorageSync: (k) => storage.has(k) ? JSON.parse(storage.get(k)) : '',
    setStorageSync: (k, v) => storage.set(k, JSON.stringify(v)),
    removeStorageSync: (k) => storage.delete(k),
    login ({ success }) { setImmediate(() => success({ code: loginCode })) },
    navigateTo ({ url }) { rt.navigations.push(url) },
    stopPullDownRefresh () {},
    createCanvasContext (id) {
      const calls = []
      const ctx = new Proxy({}, { get: (_, name) => (...args) => calls.push([name, ...args]) })
      rt.canvases.push({ id, calls })
      return ctx
    }
  }
  global.wx = wx
  global.App = (def) => { rt.app = Object.assign({}, def) }
  global.getApp = () => rt.app
  global.Page = (def) => { rt.pages[rt.loading] = def }

  // 'outpost-miniprogram' is what WeChat DevTools' "Build npm" provides.
  const resolve = Module._resolveFilename
  Module._resolveFilename = function (request, ...rest) {
    return request === 'outpost-miniprogram' ? SDK : resolve.call(this, request, ...rest)
  }

  rt.launch = () => {
    require(path.join(ROOT, 'app.js'))
    rt.app.onLaunch()
    return rt.app
  }
  // open instantiates a page as the runtime would and calls onLoad(query).
  rt.open = (route, query = {}) => {
    rt.loading = route
    require(path.join(ROOT, route + '.js'))
    const def = rt.pages[route]
    const page = Object.create(def)
    page.data = JSON.parse(JSON.stringify(def.data || {}))
    page.route = route
    page.setDataCalls = []
    page.setData = (d) => {
      page.setDataCalls.push(d)
      Object.assign(page.data, JSON.parse(JSON.stringify(d)))
    }
    page.loaded = Promise.resolve(def.onLoad ? def.onLoad.call(page, query) : undefined)
    return page
  }
  return rt
}

module.exports = { install }
