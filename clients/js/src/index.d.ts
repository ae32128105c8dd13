// Types of gavel-client (src/index.js). The wire frames are documented in docs/protocol.md.

export declare const SUBPROTOCOLS: { msgpack: "gavel.v1.msgpack"; json: "gavel.v1.json" };
export declare const CLOSE_CODES: Record<number, { reason: string; reconnect: boolean; freshToken?: boolean }>;
export declare const ERROR_CODES: readonly string[];

/** An `error` frame (protocol §9.1), or `timeout` / `disconnected` / `closed` from the client. */
export declare class GavelError extends Error {
  constructor(code: string, message: string, id?: number | null);
  readonly code: string;
  readonly id: number | null;
  /** Set on the errors of a subscription the client keeps (a resubscribe that failed). */
  channel?: string;
}

/** The SSE transport (protocol §2.5), with a WebSocket's interface; used by the client itself. */
export declare class SseSocket {
  constructor(url: string);
  readyState: number;
  binaryType: string;
  onopen: ((event?: any) => void) | null;
  onmessage: ((message: { data: string }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event?: any) => void) | null;
  send(text: string): void;
  close(code?: number, reason?: string): void;
}

export interface ViewerCounts {
  connections: number;
  users: number;
  peak_connections: number;
  peak_users: number;
}

/** A sequenced room event (protocol §5.1). */
export interface EventFrame {
  type: "event";
  channel: string;
  seq: number;
  ts: number;
  event: string;
  from: string | null;
  data: any;
  /** Only on seq 1: the epoch of the run of seqs it begins (protocol §6.3). */
  epoch?: number;
}

export interface SubscribedResult {
  kind: "subscribed";
  channel: string;
  seq: number;
  epoch: number;
  recovered?: boolean;
  replayed: number;
  viewers: ViewerCounts;
  snapshot?: { seq: number; epoch: number; viewers: ViewerCounts; oldest_seq: number | null; state: any };
  state?: any;
}

export interface Recovery {
  /** true: every missed event was replayed; false: reload from `state` / your backend. */
  recovered: boolean;
  replayed: number;
  snapshot: SubscribedResult["snapshot"] | null;
  state: any;
}

export interface SubscriptionHandlers {
  onEvent?(event: EventFrame, subscription: Subscription): void;
  onViewers?(counts: ViewerCounts, subscription: Subscription): void;
  onTyping?(frame: { channel: string; user: string; typing: boolean; ts: number }): void;
  onJoined?(frame: { channel: string; user: string; ts: number }): void;
  onLeft?(frame: { channel: string; user: string; ts: number }): void;
  /** Every `subscribed` reply, the first and each one after a reconnect. */
  onSubscribed?(result: SubscribedResult, subscription: Subscription): void;
  /** After a reconnect: whether the missed events were replayed. */
  onRecovered?(recovery: Recovery, subscription: Subscription): void;
  /** The subscription is over: a resubscribe after a reconnect was refused for good
   * (`forbidden`, `too_many_subscriptions`, ...), or a token refresh no longer lists the
   * conversation. Transient failures are retried with backoff instead. */
  onError?(error: GavelError, subscription: Subscription): void;
}

export declare class Subscription {
  readonly client: GavelClient;
  readonly channel: string;
  epoch: number | null;
  lastSeq: number;
  /** The channel's state (an auction's snapshot) as of the last `subscribed` reply (events do
   * not update it); null for an auction archived while the client was away. */
  state: any;
  viewers: ViewerCounts | null;
  active: boolean;
  unsubscribe(): Promise<void>;
}

export interface BidAccepted {
  kind: "bid_accepted";
  auction_id: string;
  request_id: string;
  bid_seq: number;
  amount: number;
  price: number;
  bid_count: number;
  next_min_bid: number;
  ends_at: number;
  server_ts: number;
  /** Whether you lead now (false when another bidder's maximum answered this bid at once). */
  leading: boolean;
  /** Your maximum, for a proxy bid. */
  max_amount?: number;
}

export interface BidRejected {
  kind: "bid_rejected";
  auction_id: string;
  request_id: string;
  reason: "unauthenticated" | "forbidden" | "unknown_auction" | "rate_limited" | "unavailable"
    | "cluster_unavailable" | "not_active" | "ended" | "invalid_amount" | "too_low" | string;
  min_amount?: number;
  message: string;
}

export interface ClientOptions {
  /** `ws://host:port/ws` or `wss://…`. */
  url: string;
  /** A token, or a function returning one (called at every connect and before expiry). */
  token?: string | (() => string | Promise<string>);
  /** `msgpack` (default) or `json`. */
  format?: "msgpack" | "json";
  /** A WebSocket constructor (browsers have one; in Node pass the `ws` package's). */
  WebSocket?: any;
  /** Timeout of each request, in ms (default 10000). */
  requestTimeout?: number;
  /** Reconnect backoff in ms, doubled per attempt with jitter (default 500 to 30000). */
  backoff?: { initial?: number; max?: number };
  /** Application pings every hello.ping_interval_ms; no answer: reconnect (default true). */
  heartbeat?: boolean;
  /** `auto` (default: WebSocket, falling back to SSE when WebSockets never open), `websocket`
   * or `sse` (protocol §2.5). */
  transport?: "auto" | "websocket" | "sse";
  /** With `auto`: WebSocket attempts that never open, in a row, before SSE (default 2). Only
   * while no WebSocket has ever opened for this client. */
  fallbackAfter?: number;
}

export type ClientState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

export declare class GavelClient {
  constructor(options: ClientOptions);
  readonly state: ClientState;
  readonly user: string | null;
  /** The transport in use. */
  readonly transport: "websocket" | "sse";
  /** Local time minus the broker's, in ms. */
  readonly clockOffset: number;
  on(name: "state", listener: (state: ClientState) => void): () => void;
  on(name: "hello", listener: (hello: any) => void): () => void;
  /** `Error` too: what a `token` function threw. */
  on(name: "error", listener: (error: GavelError | Error) => void): () => void;
  on(name: "transport", listener: (change: { transport: "sse" | "websocket"; reason: string }) => void): () => void;
  on(name: "close", listener: (close: { code: number; reason: string; reconnecting: boolean }) => void): () => void;
  /** `unsubscribed`: on a refresh, the conversations the new token no longer lists (left;
   * their subscriptions' `onError` is called). */
  on(name: "authenticated", listener: (result: { user: string; expires_at: number; unsubscribed?: string[] }) => void): () => void;
  on(name: "reconnected", listener: () => void): () => void;
  /** The broker's clock now, for countdowns. */
  serverNow(): number;
  connect(): Promise<void>;
  close(): void;
  /** Drops the connection as a network failure would; the client reconnects. */
  dropConnection(): void;
  subscribe(channel: string, handlers?: SubscriptionHandlers): Promise<Subscription>;
  unsubscribe(channel: string): Promise<void>;
  /** Resent with the same request_id across reconnects until answered; placed at most once. */
  placeBid(auctionId: string, amount: number, options?: { requestId?: string; timeout?: number; retries?: number; maxAmount?: number }): Promise<BidAccepted | BidRejected>;
  publish(channel: string, data: any): Promise<{ kind: "published"; channel: string; seq: number }>;
  typing(channel: string, typing?: boolean): Promise<{ kind: "done" }>;
  read(channel: string, seq: number): Promise<{ kind: "published"; channel: string; seq: number }>;
  presence(channel: string, limit?: number): Promise<{ kind: "presence"; channel: string; viewers: ViewerCounts; users: string[]; anonymous: number; truncated: boolean }>;
  /** Round trip in ms; also updates clockOffset. */
  ping(): Promise<number>;
}
