import { Platform, PlatformSocket } from './index'

export declare function nodePlatform (options?: {
  /** What login() sends, e.g. "dev:<openid>" against an edge with -dev-login. */
  loginCode?: string | (() => string | Promise<string>)
  /** Default: in memory. */
  storage?: { get (key: string): any, set (key: string, value: any): void, remove? (key: string): void }
  timeoutMs?: number
  tlsOptions?: object
}): Platform

/** A minimal RFC 6455 client (binary frames, ping/pong, close) over node:net / node:tls. */
export declare function connectWebSocket (url: string, options?: {
  protocols?: string[]
  headers?: Record<string, string>
  timeoutMs?: number
  tlsOptions?: object
}): PlatformSocket

/** A raw TCP (or TLS) connection in the platform socket shape, e.g. to a broker's MQTT port. */
export declare function connectTCP (options: { host: string, port: number, tls?: boolean, tlsOptions?: object }): PlatformSocket
