'use strict'
// Test harness: real Outpost binaries (edge, cloud-sync) built from this
// repository and started on free ports with temporary data directories.
// Without go the tests skip loudly, except under CI=true where they fail.

const { spawn, spawnSync } = require('node:child_process')
const fs = require('node:fs')
const os = require('node:os')
const path = require('node:path')
const net = require('node:net')
const crypto = require('node:crypto')

const REPO = path.resolve(__dirname, '..', '..', '..')
const CI = process.env.CI === 'true'
const BIN = path.join(os.tmpdir(), 'outpost-sdk-test-bin')

// missingTool returns why the real binaries cannot be had ('' if they can).
function missingTool () {
  const r = spawnSync('go', ['version'], { encoding: 'utf8' })
  if (r.error || r.status !== 0) return 'go is not installed: the SDK tests need it to build the edge and cloud-sync'
  return ''
}

// needTools skips the test (or, under CI, fails it) when go is missing.
function needTools (t) {
  const why = missingTool()
  if (!why) return true
  if (CI) throw new Error(why + ' (CI=true: failing instead of skipping)')
  console.error('SKIP: ' + why)
  t.skip(why)
  return false
}

// newestSource is the latest modification time of the Go sources.
function newestSource (dir = REPO) {
  let newest = 0
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    if (e.name === '.git' || e.name === 'node_modules' || e.name === 'testdata') continue
    const p = path.join(dir, e.name)
    if (e.isDirectory()) newest = Math.max(newest, newestSource(p))
    else if (/\.go$|^go\.(mod|sum)$/.test(e.name)) newest = Math.max(newest, fs.statSync(p).mtimeMs)
  }
  return newest
}

// sourcesTime is newestSource of the checkout, walked once per test
// process: the sources do not change while the tests run.
let sourcesAt
function sourcesTime () {
  if (sourcesAt === undefined) sourcesAt = newestSource()
  return sourcesAt
}

// binary builds cmd/<name> of this checkout into a temporary directory
// shared by every test file and run, and builds it again when a Go source
// is newer than the binary (git checkout and editors touch what they
// change). Binaries unused for 2 hours (other checkouts) are removed.
// OUTPOST_EDGE_BIN / OUTPOST_CLOUD_SYNC_BIN name prebuilt binaries instead.
function binary (name) {
  const pre = process.env['OUTPOST_' + name.toUpperCase().replace(/-/g, '_') + '_BIN']
  if (pre) return pre
  fs.mkdirSync(BIN, { recursive: true })
  for (const f of fs.readdirSync(BIN)) {
    const p = path.join(BIN, f)
    try { if (Date.now() - fs.statSync(p).mtimeMs > 2 * 3600 * 1000) fs.unlinkSync(p) } catch (_) {}
  }
  const out = path.join(BIN, `${name}-${crypto.createHash('sha256').update(REPO).digest('hex').slice(0, 12)}`)
  try {
    if (fs.statSync(out).mtimeMs > sourcesTime()) {
      fs.utimesSync(out, new Date(), new Date()) // in use: keep it
      return out
    }
  } catch (_) { /* not built yet */ }
  const tmp = `${out}.${process.pid}.tmp`
  const r = spawnSync('go', ['build', '-o', tmp, './cmd/' + name], { cwd: REPO, encoding: 'utf8', timeout: 300000 })
  if (r.status !== 0) throw new Error(`go build ./cmd/${name}: ${r.stderr || r.error}`)
  fs.renameSync(tmp, out)
  return out
}

function freePort () {
  return new Promise((resolve, reject) => {
    const s = net.createServer()
    s.unref()
    s.on('error', reject)
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => resolve(port))
    })
  })
}

function tmpDir (t, prefix) {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), prefix))
  t.after(() => fs.rmSync(d, { recursive: true, force: true }))
  return d
}

// waitFor polls cond (sync or async) until it is truthy or the deadline.
async function waitFor (what, cond, ms = 20000, every = 50) {
  const deadline = Date.now() + ms
  let last
  for (;;) {
    try {
      const v = await cond()
      if (v) return v
    } catch (err) { last = err }
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}${last ? ': ' + last.message : ''}`)
    await new Promise((resolve) => setTimeout(resolve, every))
  }
}

async function httpOK (url) {
  try {
    const r = await fetch(url, { signal: AbortSignal.timeout(1000) })
    return r.status === 200
  } catch (_) { return false }
}

// Proc is a started daemon; its output is kept for failure messages.
class Proc {
  constructor (name, bin, args, dir) {
    this.name = name
    this.log = ''
    this.proc = spawn(bin, args, { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] })
    const keep = (b) => { this.log = (this.log + b.toString()).slice(-20000) }
    this.proc.stdout.on('data', keep)
    this.proc.stderr.on('data', keep)
    this.exited = new Promise((resolve) => this.proc.on('exit', resolve))
    this.alive = true
    this.exited.then(() => { this.alive = false })
  }

  async kill () {
    if (!this.alive) return
    this.proc.kill('SIGKILL')
    await this.exited
  }

  tail () { return `--- ${this.name} output ---\n${this.log.split('\n').slice(-60).join('\n')}` }
}

// startEdge starts a standalone edge (dev login, admin "admin", open
// broker) unless args say otherwise; config is extra YAML for -config.
async function startEdge (t, { id = 'sdk-edge', args = [], config = '', devLogin = true } = {}) {
  const dir = tmpDir(t, 'outpost-sdk-edge-')
  const httpPort = await freePort()
  const mqttPort = await freePort()
  const url = `http://127.0.0.1:${httpPort}`
  const cfg = path.join(dir, 'edge.yaml')
  fs.writeFileSync(cfg, 'development: true\n' + config)
  const all = ['-config', cfg, '-id', id, '-data', path.join(dir, 'data'), '-http', `127.0.0.1:${httpPort}`,
    '-mqtt-listen', `127.0.0.1:${mqttPort}`, '-mqtt-allow-anonymous', '-admin', 'admin', '-advertise', url,
    '-policies', path.join(REPO, 'policies'), '-unsafe-no-fsync', ...(devLogin ? ['-dev-login'] : []), ...args]
  const p = new Proc('edge ' + id, binary('edge'), all, dir)
  p.url = url
  p.mqttPort = mqttPort
  t.after(async () => {
    await p.kill()
    if (t.passed === false) console.error(p.tail())
  })
  await Promise.race([
    waitFor(`edge ${id} /readyz`, () => httpOK(url + '/readyz'), 30000),
    p.exited.then(() => { throw new Error(`edge ${id} exited during start-up\n${p.tail()}`) })
  ])
  return p
}

// startCloud starts a one-node cloud-sync (bootstrap, dev login) that
// accepts the given edges with token "tok-<id>-…".
async function startCloud (t, { edges = [], args = [] } = {}) {
  const dir = tmpDir(t, 'outpost-sdk-cloud-')
  const httpPort = await freePort()
  const raftPort = await freePort()
  const url = `http://127.0.0.1:${httpPort}`
  const all = ['-id', 'n0', '-raft', `127.0.0.1:${raftPort}`, '-http', `127.0.0.1:${httpPort}`, '-data', path.join(dir, 'data'),
    '-bootstrap', '-dev-login', '-admin', 'admin', '-api-token', 'sdk-test-api-token-0123456789abcdef0123456789']
  for (const e of edges) all.push('-edge-token', `${e}=${edgeToken(e)}`)
  const p = new Proc('cloud-sync', binary('cloud-sync'), [...all, ...args], dir)
  p.url = url
  t.after(async () => {
    await p.kill()
    if (t.passed === false) console.error(p.tail())
  })
  await Promise.race([
    waitFor('cloud-sync /readyz', () => httpOK(url + '/readyz'), 30000),
    p.exited.then(() => { throw new Error(`cloud-sync exited during start-up\n${p.tail()}`) })
  ])
  return p
}

function edgeToken (id) { return 'tok-' + id + '-secret-0123456789abcdef0123456789' }

// api is a raw envelope call, for setting up and checking from outside the SDK.
async function api (base, method, p, { token, body } = {}) {
  const headers = {}
  if (token) headers.Authorization = 'Bearer ' + token
  if (body !== undefined) headers['Content-Type'] = 'application/json'
  const r = await fetch(base + p, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal: AbortSignal.timeout(5000) })
  const env = await r.json().catch(() => null)
  return { status: r.status, env }
}

module.exports = { REPO, CI, needTools, binary, freePort, tmpDir, waitFor, startEdge, startCloud, edgeToken, api, Proc }
