// gavel-client: a client for the Gavel broker's WebSocket protocol (docs/protocol.md), for
// browsers and Node. It owns one connection at a time: authentication and token refresh,
// request/reply matching with timeouts, subscriptions that survive reconnects (resubscribed with
// `since` + `epoch`), bids retried with the same `request_id` until answered, and reconnects with
// jittered exponential backoff. No build step: an ES module with JSDoc types and index.d.ts.

import { CLOSE_CODES, ERROR_CODES, GavelError, SUBPROTOCOLS } from "./codes.js";
import { loadMsgpack } from "./codec.js";
import { SseSocket } from "./sse.js";
import { Subscription } from "./subscription.js";

export { CLOSE_CODES, ERROR_CODES, GavelError, SUBPROTOCOLS, SseSocket, Subscription };

/** How long after falling back to SSE the client tries WebSockets again (at a reconnect). */
const WEBSOCKET_RETRY_MS = 5 * 60_000;

/** `auth` errors that no retry with the same token provider can fix. */
const FATAL_AUTH = new Set(["token_invalid", "forbidden"]);

/** Bid rejections worth resending with the same `request_id` (protocol §4.10). */
const TRANSIENT_REJECTIONS = new Set(["rate_limited", "unavailable", "cluster_unavailable"]);

/**
 * A connection to a Gavel broker that keeps itself connected.
 */
export class GavelClient {
  /** @param {import("./index.d.ts").ClientOptions} options */
  constructor(options) {
    if (!options || !options.url) throw new TypeError("gavel-client: `url` is required");
    this.url = options.url;
    this.format = options.format === "json" ? "json" : "msgpack";
    /** 'auto' (WebSocket, falling back to SSE), 'websocket' or 'sse' */
    this.transportOption = options.transport || "auto";
    /** the transport in use: 'websocket' or 'sse' */
    this.transport = this.transportOption === "sse" ? "sse" : "websocket";
    this.fallbackAfter = options.fallbackAfter ?? 2;
    this._failedOpens = 0;
    this.getToken = typeof options.token === "function"
      ? options.token
      : options.token ? async () => options.token : null;
    this._fixedToken = typeof options.token === "string";
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    if (!this.WebSocket) {
      if (this.transportOption === "websocket") {
        throw new TypeError("gavel-client: no WebSocket: pass options.WebSocket (e.g. from the `ws` package)");
      }
      this.transport = "sse";
    }
    this.requestTimeout = options.requestTimeout ?? 10_000;
    this.backoff = { initial: 500, max: 30_000, ...(options.backoff || {}) };
    this.heartbeat = options.heartbeat ?? true;
    /** 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed' */
    this.state = "idle";
    /** @type {string|null} the user the broker says this connection is */
    this.user = null;
    /** local time minus broker time, in ms (from `hello` and `pong`) */
    this.clockOffset = 0;
    this._listeners = new Map();
    this._ws = null;
    this._nextId = 1;
    /** @type {Map<number, {resolve: Function, reject: Function, timer: any, bid?: object}>} */
    this._pending = new Map();
    /** @type {Map<string, Subscription>} */
    this._subscriptions = new Map();
    /** @type {Map<string, object>} bids waiting for an answer, by request_id */
    this._bids = new Map();
    this._attempt = 0;
    this._reconnectTimer = null;
    this._refreshTimer = null;
    this._heartbeatTimer = null;
    this._readyWaiters = [];
    this._closedByUser = false;
    this._everOpen = false;
    this._pingInterval = 0;
    this._bidCounter = 0;
    /** the MessagePack codec, once loaded */
    this._codec = null;
    this._clientId = Math.random().toString(36).slice(2, 10);
    this._onOnline = () => { if (this.state === "reconnecting") this._reconnectNow(); };
    this._onOffline = () => { if (this._ws) this._ws.close(4999, "offline"); };
    if (typeof globalThis.addEventListener === "function") {
      globalThis.addEventListener("online", this._onOnline);
      globalThis.addEventListener("offline", this._onOffline);
    }
  }

  // ---- events ----

  /**
   * Listens to a client event: `state` (new state), `hello`, `error` (an unprompted `error`
   * frame, or a GavelError about the connection), `close` ({code, reason, reconnecting}),
   * `authenticated`, `reconnected`.
   * @param {string} name @param {(value: any) => void} listener
   */
  on(name, listener) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(listener);
    return () => this._listeners.get(name)?.delete(listener);
  }

  _emit(name, value) {
    for (const listener of this._listeners.get(name) || []) {
      try { listener(value); } catch (error) { queueMicrotask(() => { throw error; }); }
    }
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("state", state);
  }

  /** The broker's clock now (ms since the Unix epoch), from the offset measured at `hello` and pings. */
  serverNow() {
    return Date.now() - this.clockOffset;
  }

  // ---- connection ----

  /** Opens the connection; resolves once it is open and authenticated (if a token is set). */
  async connect() {
    this._closedByUser = false;
    if (this.state === "open") return;
    if (this.format === "msgpack" && !this._codec) this._codec = await loadMsgpack();
    if (this.state === "idle" || this.state === "closed") this._open();
    await this._whenReady(Infinity);
  }

  /** Closes for good (close code 1000); pending requests fail with `closed`. */
  close() {
    this._closedByUser = true;
    clearTimeout(this._reconnectTimer);
    this._stopTimers();
    if (typeof globalThis.removeEventListener === "function") {
      globalThis.removeEventListener("online", this._onOnline);
      globalThis.removeEventListener("offline", this._onOffline);
    }
    const ws = this._ws;
    this._ws = null;
    if (ws) ws.close(1000, "client closed");
    this._failPending("closed", "the client was closed", true);
    this._setState("closed");
  }

  _open() {
    this._setState(this._attempt === 0 && this.state !== "reconnecting" ? "connecting" : "reconnecting");
    let ws;
    try {
      ws = this.transport === "sse"
        ? new SseSocket(this.url)
        : new this.WebSocket(this.url, [SUBPROTOCOLS[this.format]]);
    } catch (error) {
      this._scheduleReconnect({ code: 1006, reason: String(error) });
      return;
    }
    ws.binaryType = "arraybuffer";
    this._ws = ws;
    ws._opened = false;
    ws.onopen = () => {
      if (this._ws !== ws) return;
      ws._opened = true;
      this._failedOpens = 0;
      this._onOpen(ws);
    };
    ws.onmessage = (message) => { if (this._ws === ws) this._onMessage(message.data); };
    ws.onclose = (event) => { if (this._ws === ws) this._onClose(event.code, event.reason); };
    ws.onerror = () => { /* onclose follows */ };
  }

  async _onOpen(ws) {
    try {
      if (this.getToken) await this._authenticate();
    } catch (error) {
      if (this._ws !== ws) return; // that connection is gone already
      this._emit("error", error);
      if (FATAL_AUTH.has(error.code) || (error.code === "token_expired" && this._fixedToken)) {
        // Retrying cannot help: the token is refused for good. Stop, and tell the waiters.
        this._fatal(error);
        return;
      }
      // A transient failure (a timeout, a lost connection): close and let the backoff run.
      ws.close(4998, "authentication failed");
      return;
    }
    if (this._ws !== ws) return;
    this._attempt = 0;
    const wasReconnect = this._everOpen;
    this._everOpen = true;
    this._setState("open");
    this._startHeartbeat();
    // Resubscribe with since + epoch (protocol §6.5), then resend unanswered bids.
    for (const subscription of this._subscriptions.values()) {
      this._ensureSubscribed(subscription).catch((error) => this._emit("error", error));
    }
    for (const bid of this._bids.values()) this._sendBid(bid);
    const waiters = this._readyWaiters;
    this._readyWaiters = [];
    for (const waiter of waiters) waiter.resolve();
    if (wasReconnect) this._emit("reconnected", undefined);
  }

  /** Stops for good after an error no retry can fix; pending work fails with it. */
  _fatal(error) {
    this._closedByUser = true;
    const ws = this._ws;
    this._ws = null;
    if (ws) ws.close(1000, "fatal error");
    this._stopTimers();
    for (const waiter of this._readyWaiters) waiter.reject(error);
    this._readyWaiters = [];
    this._failPending(error.code, error.message, true);
    this._setState("closed");
  }

  async _authenticate() {
    const token = await this.getToken();
    const result = await this._request({ type: "auth", token }, { whenOpen: false });
    this.user = result.user;
    this._emit("authenticated", result);
    this._scheduleRefresh(result.expires_at);
  }

  _scheduleRefresh(expiresAt) {
    clearTimeout(this._refreshTimer);
    if (!expiresAt) return;
    // A minute before expiry, or at 80 % of what is left when that is under five minutes.
    const left = expiresAt - this.serverNow();
    const wait = Math.max(1_000, left > 300_000 ? left - 60_000 : left * 0.8);
    this._refreshTimer = setTimeout(() => this._refresh(), wait);
  }

  async _refresh() {
    if (this.state !== "open" || !this.getToken) return;
    try {
      const token = await this.getToken();
      const result = await this._request({ type: "auth", token });
      this._emit("authenticated", result);
      this._scheduleRefresh(result.expires_at);
    } catch (error) {
      this._emit("error", error);
    }
  }

  _startHeartbeat() {
    this._stopHeartbeat();
    // On SSE only POSTs count as life for the broker's idle timeout: always ping there.
    if (!this.heartbeat && this.transport !== "sse") return;
    // Browsers cannot see WebSocket pings: an application ping shows the connection is alive,
    // and measures the clock offset. No answer within the request timeout: reconnect.
    const every = this._pingInterval || 15_000;
    this._heartbeatTimer = setInterval(() => {
      this.ping().catch((error) => {
        if (error.code === "timeout" && this._ws) this._ws.close(4997, "no answer to ping");
      });
    }, every);
  }

  _stopHeartbeat() {
    clearInterval(this._heartbeatTimer);
    this._heartbeatTimer = null;
  }

  _stopTimers() {
    this._stopHeartbeat();
    clearTimeout(this._refreshTimer);
  }

  _onClose(code, reason) {
    const opened = this._ws?._opened;
    this._ws = null;
    if (!opened && this.transport === "websocket" && this.transportOption === "auto") {
      // A WebSocket that never opened: after `fallbackAfter` of them in a row, the network
      // probably blocks WebSockets; use the SSE transport from now on.
      this._failedOpens += 1;
      if (this._failedOpens >= this.fallbackAfter) {
        this.transport = "sse";
        this._attempt = 0;
        // The network may change (another Wi-Fi, a proxy fixed): try WebSockets again later.
        this._websocketAgainAt = Date.now() + WEBSOCKET_RETRY_MS;
        this._emit("transport", { transport: "sse", reason: `${this._failedOpens} WebSocket attempts failed` });
      }
    }
    this._stopTimers();
    for (const subscription of this._subscriptions.values()) subscription.active = false;
    // Requests in flight are lost with the connection; bids are kept and resent.
    this._failPending("disconnected", `connection closed (${code})`, false);
    const known = CLOSE_CODES[code];
    // The broker closes with 1000 only to answer a close the client sent (which, unless
    // close() was called, was one to reconnect): so every close but close()'s reconnects.
    const reconnecting = !this._closedByUser;
    this._emit("close", { code, reason: reason || known?.reason || "", reconnecting });
    if (reconnecting) this._scheduleReconnect({ code, reason });
    else this._setState("closed");
  }

  _scheduleReconnect({ code }) {
    this._setState("reconnecting");
    clearTimeout(this._reconnectTimer);
    const base = Math.min(this.backoff.max, this.backoff.initial * 2 ** this._attempt);
    // After a rate-limit close, wait longer (protocol §9.2).
    const factor = code === 1008 ? 4 : 1;
    const delay = Math.min(this.backoff.max, base * factor) * (0.5 + Math.random() / 2);
    this._attempt += 1;
    this._reconnectTimer = setTimeout(() => this._reconnectNow(), delay);
  }

  _reconnectNow() {
    clearTimeout(this._reconnectTimer);
    if (this._closedByUser) return;
    if (this.transport === "sse" && this.transportOption === "auto" && this.WebSocket
      && this._websocketAgainAt && Date.now() >= this._websocketAgainAt) {
      this.transport = "websocket";
      this._failedOpens = 0;
      this._websocketAgainAt = null;
    }
    if (globalThis.navigator && globalThis.navigator.onLine === false) {
      // Offline: the `online` event reconnects.
      return;
    }
    this._open();
  }

  /** Test and app hook: drop the connection as a network failure would, and reconnect. */
  dropConnection() {
    if (this._ws) this._ws.close(4996, "dropped by the application");
  }

  _whenReady(timeout) {
    if (this.state === "open") return Promise.resolve();
    if (this.state === "closed") return Promise.reject(new GavelError("closed", "the client is closed"));
    return new Promise((resolve, reject) => {
      let timer = null;
      const waiter = {
        resolve: () => { clearTimeout(timer); resolve(); },
        reject: (error) => { clearTimeout(timer); reject(error); },
      };
      this._readyWaiters.push(waiter);
      if (Number.isFinite(timeout)) {
        timer = setTimeout(() => {
          this._readyWaiters = this._readyWaiters.filter((w) => w !== waiter);
          reject(new GavelError("timeout", "not connected in time"));
        }, timeout);
      }
    });
  }

  _failPending(code, message, bidsToo) {
    for (const [id, pending] of this._pending) {
      clearTimeout(pending.timer);
      this._pending.delete(id);
      // A bid's attempt is forgotten, not the bid: it is resent at the next connect.
      if (!pending.bid) pending.reject(new GavelError(code, message, id));
    }
    if (bidsToo) {
      for (const bid of this._bids.values()) bid.reject(new GavelError(code, message));
      this._bids.clear();
    }
    if (code === "closed") {
      for (const waiter of this._readyWaiters) waiter.reject(new GavelError(code, message));
      this._readyWaiters = [];
    }
  }

  // ---- frames ----

  _send(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    if (this.format === "json" || this.transport === "sse") ws.send(JSON.stringify(frame));
    else ws.send(this._codec.encode(frame, { ignoreUndefined: true }));
    return true;
  }

  _decode(data) {
    if (typeof data === "string") return JSON.parse(data);
    const bytes = data instanceof ArrayBuffer ? new Uint8Array(data) : data;
    return this._codec.decode(bytes, { useBigInt64: false });
  }

  _onMessage(data) {
    let frame;
    try {
      frame = this._decode(data);
    } catch (error) {
      this._emit("error", new GavelError("bad_frame", `undecodable frame from the broker: ${error}`));
      return;
    }
    switch (frame.type) {
      case "hello":
        this.clockOffset = Date.now() - frame.server_ts;
        if (frame.ping_interval_ms !== this._pingInterval) {
          this._pingInterval = frame.ping_interval_ms;
          if (this.state === "open") this._startHeartbeat();
        }
        if (frame.user) this.user = frame.user;
        this._emit("hello", frame);
        return;
      case "ok":
      case "error":
        return this._onReply(frame);
      case "event":
        return this._onEvent(frame);
      case "viewers": {
        const subscription = this._active(frame.channel);
        if (!subscription) return;
        const { connections, users, peak_connections, peak_users } = frame;
        subscription.viewers = { connections, users, peak_connections, peak_users };
        subscription.handlers.onViewers?.(subscription.viewers, subscription);
        return;
      }
      case "typing":
        return this._active(frame.channel)?.handlers.onTyping?.(frame);
      case "joined":
        return this._active(frame.channel)?.handlers.onJoined?.(frame);
      case "left":
        return this._active(frame.channel)?.handlers.onLeft?.(frame);
      default:
        // Unknown frame types are ignored (protocol §1.4: new types may be added).
        return;
    }
  }

  /** The subscription of `channel`, if the broker confirmed it on this connection. */
  _active(channel) {
    const subscription = this._subscriptions.get(channel);
    return subscription && subscription.active ? subscription : null;
  }

  _onReply(frame) {
    if (frame.id == null) {
      // Unprompted: `token_expired` (refresh at once) or `rate_limited` (a dropped message).
      const error = new GavelError(frame.code, frame.message, null);
      if (frame.code === "token_expired") this._refresh();
      this._emit("error", error);
      return;
    }
    const pending = this._pending.get(frame.id);
    if (!pending) return;
    this._pending.delete(frame.id);
    clearTimeout(pending.timer);
    if (frame.type === "error") {
      pending.reject(new GavelError(frame.code, frame.message, frame.id));
      return;
    }
    try {
      pending.onReply?.(frame.result);
    } catch (error) {
      queueMicrotask(() => { throw error; });
    }
    pending.resolve(frame.result);
  }

  _onEvent(frame) {
    const subscription = this._active(frame.channel);
    if (!subscription) return;
    if (frame.epoch != null && frame.epoch !== subscription.epoch) {
      // Seq 1 of a run of seqs this subscription was not told of (protocol §6.3).
      if (subscription.lastSeq !== 0) {
        // The room started over (cluster: its keys expired, or Redis failed over).
        this._resync(subscription);
        return;
      }
      // A cluster room that had no event when we subscribed (epoch 0): its first one.
      subscription.epoch = frame.epoch;
    }
    if (frame.seq <= subscription.lastSeq) return; // a duplicate
    if (frame.seq > subscription.lastSeq + 1) {
      // A gap (cannot happen within one connection): resubscribe with since.
      this._resync(subscription);
      return;
    }
    subscription.lastSeq = frame.seq;
    subscription.handlers.onEvent?.(frame, subscription);
  }

  /** Resubscribes with `since` and `epoch` (protocol §6.5): the broker replays or snapshots. */
  _resync(subscription) {
    subscription.active = false;
    this._request({ type: "unsubscribe", channel: subscription.channel })
      .catch(() => {})
      .then(() => this._ensureSubscribed(subscription))
      .catch((error) => this._emit("error", error));
  }

  /**
   * Sends a request and resolves with its `result` (rejects with a GavelError).
   * @param {object} frame without `id`
   * @param {{timeout?: number, whenOpen?: boolean, onReply?: (result: any) => void}} [options]
   *   `onReply` runs as the reply is read, before any later message is handled
   */
  async _request(frame, options = {}) {
    const timeout = options.timeout ?? this.requestTimeout;
    if (options.whenOpen !== false) await this._whenReady(timeout);
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new GavelError("timeout", `no reply to ${frame.type} within ${timeout} ms`, id));
      }, timeout);
      this._pending.set(id, { resolve, reject, timer, onReply: options.onReply });
      if (!this._send({ ...frame, id })) {
        clearTimeout(timer);
        this._pending.delete(id);
        reject(new GavelError("disconnected", "not connected", id));
      }
    });
  }

  // ---- requests ----

  /**
   * Subscribes to a channel and keeps the subscription across reconnects. Resolves with the
   * Subscription once the broker confirmed it.
   * @param {string} channel
   * @param {import("./index.d.ts").SubscriptionHandlers} [handlers]
   */
  async subscribe(channel, handlers = {}) {
    if (this._subscriptions.has(channel)) {
      throw new GavelError("already_subscribed", `already subscribed to ${channel}`);
    }
    const subscription = new Subscription(this, channel, handlers);
    this._subscriptions.set(channel, subscription);
    try {
      await this._whenReady(this.requestTimeout);
      await this._ensureSubscribed(subscription);
    } catch (error) {
      // Rejected means not subscribed: forget it (a later reply is ignored), and if the broker
      // may have subscribed after all (no reply in time), leave again.
      if (this._subscriptions.get(channel) === subscription) this._subscriptions.delete(channel);
      if (error.code === "timeout" && this.state === "open") {
        this._request({ type: "unsubscribe", channel }).catch(() => {});
      }
      throw error;
    }
    return subscription;
  }

  /** Sends `subscribe` unless the subscription is active or its subscribe is in flight. */
  _ensureSubscribed(subscription) {
    if (subscription.active) return Promise.resolve();
    if (!subscription.inflight) {
      subscription.inflight = this._sendSubscribe(subscription)
        .finally(() => { subscription.inflight = null; });
    }
    return subscription.inflight;
  }

  async _sendSubscribe(subscription) {
    const frame = { type: "subscribe", channel: subscription.channel };
    const resumed = subscription.epoch != null;
    if (resumed) {
      frame.since = subscription.lastSeq;
      frame.epoch = subscription.epoch;
    }
    // Applied as the reply is read, before the next message: the replayed events follow the
    // reply at once and must find the subscription active.
    const apply = (result) => {
      if (this._subscriptions.get(subscription.channel) !== subscription) return;
      subscription.epoch = result.epoch;
      subscription.viewers = result.viewers;
      if ("state" in result) subscription.state = result.state ?? null;
      if (result.recovered === false) {
        // The history cannot prove it has every event missed: start over from the reply.
        subscription.lastSeq = result.seq;
        subscription.state = result.snapshot?.state ?? subscription.state;
        subscription.viewers = result.snapshot?.viewers ?? subscription.viewers;
      } else if (!resumed) {
        subscription.lastSeq = result.seq;
      }
      // With recovered: true, lastSeq stays: the replayed events follow and advance it.
      subscription.active = true;
      subscription.handlers.onSubscribed?.(result, subscription);
      if (resumed) {
        subscription.handlers.onRecovered?.({
          recovered: result.recovered === true,
          replayed: result.replayed ?? 0,
          snapshot: result.snapshot ?? null,
          state: subscription.state,
        }, subscription);
      }
    };
    return this._request(frame, { whenOpen: false, onReply: apply });
  }

  /** Leaves a channel; its subscription is forgotten. */
  async unsubscribe(channel) {
    const subscription = this._subscriptions.get(channel);
    this._subscriptions.delete(channel);
    if (!subscription || this.state !== "open") return;
    subscription.active = false;
    try {
      await this._request({ type: "unsubscribe", channel });
    } catch (error) {
      if (error.code !== "not_subscribed") throw error;
    }
  }

  /**
   * Places a bid. The same `request_id` is sent again after every reconnect until the broker
   * answers, and after a transient rejection (`rate_limited`, `unavailable`,
   * `cluster_unavailable`) up to `retries` times: a bid is placed at most once. Resolves with
   * the `bid_accepted` or `bid_rejected` result.
   * @param {string} auctionId
   * @param {number} amount in the currency's minor unit
   * @param {{requestId?: string, timeout?: number, retries?: number, maxAmount?: number}} [options]
   *   `maxAmount`: a proxy bid, the secret maximum the broker bids up to for you (send
   *   `amount` = the current `next_min_bid`); the answer's `leading` says whether you lead.
   */
  placeBid(auctionId, amount, options = {}) {
    const requestId = options.requestId
      || `${this._clientId}-${Date.now().toString(36)}-${++this._bidCounter}`;
    const timeout = options.timeout ?? 60_000;
    return new Promise((resolve, reject) => {
      const bid = {
        auctionId, amount, maxAmount: options.maxAmount, requestId, resolve, reject,
        retriesLeft: options.retries ?? 3, attempts: 0, timer: null,
      };
      bid.timer = setTimeout(() => {
        if (this._bids.get(requestId) === bid) this._bids.delete(requestId);
        bid.reject(new GavelError("timeout", `no answer to bid ${requestId} within ${timeout} ms`));
      }, timeout);
      bid.resolve = (result) => { clearTimeout(bid.timer); clearTimeout(bid.retry); resolve(result); };
      bid.reject = (error) => { clearTimeout(bid.timer); clearTimeout(bid.retry); reject(error); };
      const earlier = this._bids.get(requestId);
      if (earlier) {
        // The same request_id again while the first is unanswered: one bid, two callers.
        earlier.resolve = ((first) => (result) => { first(result); bid.resolve(result); })(earlier.resolve);
        earlier.reject = ((first) => (error) => { first(error); bid.reject(error); })(earlier.reject);
        return;
      }
      this._bids.set(requestId, bid);
      this._sendBid(bid);
    });
  }

  _sendBid(bid) {
    if (this._bids.get(bid.requestId) !== bid) return; // answered or given up meanwhile
    if (this.state !== "open") return; // sent at the next connect
    const id = this._nextId++;
    bid.attempts += 1;
    const current = () => this._bids.get(bid.requestId) === bid;
    const again = (delay) => {
      clearTimeout(bid.retry);
      bid.retry = setTimeout(() => this._sendBid(bid), delay);
    };
    // A frame can be dropped without a reply (a rate-limited message is answered with an
    // id-less error): without an answer in time, send the same request_id again.
    const timer = setTimeout(() => {
      if (this._pending.get(id)?.bid === bid) this._pending.delete(id);
      if (current()) this._sendBid(bid);
    }, this.requestTimeout);
    this._pending.set(id, {
      bid,
      timer,
      resolve: (result) => {
        if (!current()) return;
        if (result.kind === "bid_rejected" && TRANSIENT_REJECTIONS.has(result.reason)
          && bid.retriesLeft > 0) {
          bid.retriesLeft -= 1;
          again(250 * bid.attempts);
          return;
        }
        this._bids.delete(bid.requestId);
        bid.resolve(result);
      },
      reject: (error) => {
        if (!current()) return;
        // During a token's grace period (the refresh is under way) or a rate limit: later.
        if (error.code === "token_expired" || error.code === "rate_limited") {
          again(1000);
          return;
        }
        this._bids.delete(bid.requestId);
        bid.reject(error);
      },
    });
    this._send({
      type: "place_bid", id, auction_id: bid.auctionId, amount: bid.amount, request_id: bid.requestId,
      ...(bid.maxAmount === undefined ? {} : { max_amount: bid.maxAmount }),
    });
  }

  /** Sends a chat message into a conversation; resolves with `{kind: "published", seq}`. */
  publish(channel, data) {
    return this._request({ type: "publish", channel, data: data ?? null });
  }

  /** A typing indicator in a conversation (not stored). */
  typing(channel, typing = true) {
    return this._request({ type: "typing", channel, typing });
  }

  /** A read receipt: read up to `seq` in a conversation. */
  read(channel, seq) {
    return this._request({ type: "read", channel, seq });
  }

  /** Who is in a room (the connection must be subscribed to it). */
  presence(channel, limit) {
    return this._request({ type: "presence", channel, limit });
  }

  /** An application round trip; updates the clock offset. Resolves with the round trip in ms. */
  async ping() {
    const sent = Date.now();
    const result = await this._request({ type: "ping" });
    const now = Date.now();
    this.clockOffset = (sent + now) / 2 - result.server_ts;
    return now - sent;
  }
}
