// Type definitions for outpost-miniprogram.

/** The platform the client runs on: wx (default in a mini-program) or nodePlatform(). */
export interface Platform {
  name?: string
  /** One HTTP request; rejects (with `network: true`) only when no response arrived. */
  request (req: {
    method: string
    url: string
    headers: Record<string, string>
    body?: unknown
    timeoutMs?: number
  }): Promise<{ status: number, headers: Record<string, string>, data: any }>
  connectSocket (opts: { url: string, protocols: string[] }): PlatformSocket
  getStorage (key: string): any
  setStorage (key: string, value: any): void
  removeStorage? (key: string): void
  /** A login code: wx.login's code, or nodePlatform's loginCode. */
  login (): Promise<string>
}

/** A WebSocket (or TCP) connection in the shape of wx's SocketTask. */
export interface PlatformSocket {
  send (data: Uint8Array): void
  close (): void
  onOpen (cb: () => void): void
  onMessage (cb: (data: Uint8Array) => void): void
  onClose (cb: (info?: any) => void): void
  onError (cb: (err: Error) => void): void
}

export interface ClientOptions {
  /** The cloud-sync URL: used for nearest-edge choice and as the last failover target. */
  cloud?: string
  /** Edge API base URLs, in order of preference. */
  edges?: Array<string | { url: string }>
  /** Default: the wx platform (the `wx` global). */
  platform?: Platform
  /** With cloud and no edges: after login, ask the cloud for the edges nearest here. */
  location?: { lat: number, lng: number }
  /** Concurrent requests, at most (and by default) 10: WeChat's limit. */
  maxConcurrent?: number
  /** Per request, default 10000. */
  timeoutMs?: number
  /** How long a failed target is tried only after the others, default 30000. */
  downMs?: number
  /** MQTT keepalive of the live feed in seconds, default 30. */
  keepalive?: number
  /** Responses kept in memory for ETag revalidation, default 100. */
  maxEtags?: number
  /** Prefix of the storage keys (tokens and cache), default "outpost:". */
  storagePrefix?: string
}

export interface Page<T> { items: T[], next_cursor?: string | null }
/** Present (true) only on data served from the offline cache. */
export interface MaybeStale { stale?: true, cached_at?: number }

export interface Reading { ts: number, metrics: Record<string, number>, [k: string]: any }

export interface Device {
  id: string
  edge_id?: string
  first_seen?: number
  last_seen?: number
  online?: boolean
  region?: string
  tags?: Record<string, string>
  owners?: string[]
  reported?: Record<string, any>
  desired?: Record<string, any>
  /** With include: 'latest'. */
  latest?: Reading | null
  [k: string]: any
}

export interface Alert {
  id: string
  rule: string
  device: string
  severity: string
  state: 'active' | 'acknowledged' | 'cleared'
  message: string
  value?: number
  started_at: number
  acked_at?: number | null
  acked_by?: string | null
  cleared_at?: number | null
}

export interface NearestEdge {
  id: string
  url: string
  region: string
  location: { lat: number, lng: number } | null
  distance_km: number | null
  healthy: boolean
  lag_ms: number
  backlog: number
}

export interface LiveMessage {
  device: string
  kind: 'telemetry' | 'state' | 'desired' | 'alert'
  topic: string
  /** The payload, parsed as JSON when it is JSON. */
  data: any
  retain: boolean
}

export interface Live {
  close (): void
  readonly connected: boolean
}

type Time = number | string | Date

export declare class Client {
  constructor (options: ClientOptions)
  readonly openid: string | null
  /** The base URL that answered last. */
  readonly current: string | null
  /** The base URL the live feed last connected to. */
  readonly liveBase: string | null
  /** Refreshes sent so far (for diagnostics and tests). */
  readonly refreshes: number
  /** Nearest edges, configured edges, then the cloud. */
  targets (): string[]
  login (opts?: { code?: string }): Promise<{ openid: string, expires_in: number }>
  logout (): void
  nearest (q: { lat: number, lng: number, limit?: number }): Promise<NearestEdge[]>
  devices (q?: { limit?: number, cursor?: string, include?: 'latest' }): Promise<Page<Device> & MaybeStale>
  device (id: string): Promise<Device>
  latest (id: string): Promise<Reading & MaybeStale>
  readings (id: string, q?: { metric?: string, from?: Time, to?: Time, limit?: number, cursor?: string }): Promise<Page<Reading>>
  stats (id: string, q?: { metric?: string, from?: Time, to?: Time, step?: string }): Promise<{ buckets: Array<{ ts: number, count: number, min: number, max: number, avg: number }> }>
  setDesired (id: string, state: Record<string, any>): Promise<Device>
  alerts (q?: { state?: 'active' | 'acknowledged' | 'cleared', device?: string, limit?: number, cursor?: string }): Promise<Page<Alert>>
  ack (alertId: string): Promise<Alert>
  /** Subscribes over the shared MQTT-over-WebSocket connection to the current edge's /mqtt. */
  live (id: string, cb: (msg: LiveMessage) => void, opts?: { onError? (err: OutpostError): void }): Live
  /** Closes the live connection. */
  close (): void
}

export declare function createClient (options: ClientOptions): Client

/** An error with the response envelope's code and message; code -1: no server answered. */
export declare class OutpostError extends Error {
  code: number
  status: number
  data: any
  network: boolean
  /** A network error or a 5xx: the offline cache may be used. */
  offline: boolean
}

export interface MqttMessage { topic: string, payload: Uint8Array, qos: number, retain: boolean }

export declare class MqttClient {
  constructor (options: {
    open (): PlatformSocket
    credentials? (): Promise<{ username?: string, password?: string }>
    clientId?: string
    keepalive?: number
    backoff?: { min: number, max: number }
    onMessage? (m: MqttMessage): void
    onConnect? (): void
    onDisconnect? (err: Error): void
    onRefused? (rc: number, err: Error): unknown
    onSuback? (topics: string[], codes: number[]): void
  })
  readonly connected: boolean
  readonly connects: number
  connect (): this
  /** Resolves with the SUBACK return codes (0x80: refused), or null when not connected yet. */
  subscribe (topics: string | string[], qos?: 0 | 1): Promise<number[] | null>
  unsubscribe (topics: string | string[]): Promise<number[] | null>
  publish (topic: string, payload: string | Uint8Array, opts?: { qos?: 0 | 1, retain?: boolean }): Promise<unknown>
  close (): void
}

export declare function wxPlatform (wx: any): Platform
