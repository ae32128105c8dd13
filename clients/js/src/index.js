// gavel-client: a client for the Gavel broker's protocol (docs/protocol.md), for browsers and
// Node. One connection at a time: authentication and token refresh, requests with timeouts,
// subscriptions kept across reconnects (`since` + `epoch`), bids resent until answered
// (bids.js), reconnects with jittered backoff. No build step: ES modules, JSDoc and index.d.ts.

import { CLOSE_CODES, ERROR_CODES, GavelError, SUBPROTOCOLS } from "./codes.js";
import { placeBid, sendBid } from "./bids.js";
import { loadMsgpack } from "./codec.js";
import { SseSocket } from "./sse.js";
import { refresh, scheduleRefresh } from "./tokens.js";
import { Subscription } from "./subscription.js";

export { CLOSE_CODES, ERROR_CODES, GavelError, SUBPROTOCOLS, SseSocket, Subscription };

/** How long after falling back to SSE the client tries WebSockets again (at a reconnect). */
const WEBSOCKET_RETRY_MS = 5 * 60_000;

/** `auth` errors that no retry with the same token provider can fix. */
const FATAL_AUTH = new Set(["token_invalid", "forbidden"]);

/** `subscribe` errors no retry fixes (a `forbidden` that says "retry later" is not one). */
const FINAL_SUBSCRIBE_ERRORS = new Set([
  "forbidden", "invalid_channel", "invalid_request", "too_many_subscriptions", "unauthenticated",
]);

/** Resubscribes sent at once after a reconnect, then a second's pause: under the broker's
 * default burst of 100 messages and rate of 50/s (protocol §10), with room for bids. */
const RESUBSCRIBE_BATCH = 40;


/**
 * A connection to a Gavel broker that keeps itself connected.
 */
export class GavelClient {
  /** @param {import("./index.d.ts").ClientOptions} options */
  constructor(options) {
    if (!options || !options.url) throw new TypeError("gavel-client: `url` is required");
    let url;
    try { url = new URL(options.url); } catch { url = null; }
    if (!url || !["ws:", "wss:", "http:", "https:"].includes(url.protocol)) {
      throw new TypeError(`gavel-client: \`url\` must be an absolute ws:// or wss:// URL, not ${options.url}`);
    }
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
    this._onOffline = () => this._drop(4999, "offline");
    this._listenToNetwork(true);
  }

  /** Follows the browser's `online` / `offline` events (or stops following them). */
  _listenToNetwork(on) {
    if (on === this._networkListened || typeof globalThis.addEventListener !== "function") return;
    this._networkListened = on;
    const method = on ? "addEventListener" : "removeEventListener";
    globalThis[method]("online", this._onOnline);
    globalThis[method]("offline", this._onOffline);
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
    this._listenToNetwork(true);
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
    this._listenToNetwork(false);
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
      if (this.transport === "websocket") this._websocketWorked = true;
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
      // A transient failure (a timeout, a lost connection): drop it and let the backoff run.
      this._drop(4998, "authentication failed");
      return;
    }
    if (this._ws !== ws) return;
    this._attempt = 0;
    const wasReconnect = this._everOpen;
    this._everOpen = true;
    this._setState("open");
    this._startHeartbeat();
    // Resend unanswered bids, then resubscribe with since + epoch (protocol §6.5).
    for (const bid of this._bids.values()) this._sendBid(bid);
    this._resubscribeAll(ws);
    const waiters = this._readyWaiters;
    this._readyWaiters = [];
    for (const waiter of waiters) waiter.resolve();
    if (wasReconnect) this._emit("reconnected", undefined);
  }

  /** Resubscribes every channel, a batch at a time (so as not to be rate-limited). */
  async _resubscribeAll(ws) {
    const subscriptions = [...this._subscriptions.values()];
    for (let i = 0; i < subscriptions.length; i += RESUBSCRIBE_BATCH) {
      if (i > 0) await new Promise((resolve) => setTimeout(resolve, 1000));
      if (this._ws !== ws) return; // the next connection resubscribes
      await Promise.all(subscriptions.slice(i, i + RESUBSCRIBE_BATCH)
        .map((subscription) => this._keepSubscribed(subscription)));
    }
  }

  /**
   * Subscribes again until the broker confirms (retrying with backoff while the connection
   * lasts); resolves either way. An error no retry fixes ends the subscription: its
   * `onError` handler and the client's `error` event (with `channel`) say so.
   */
  _keepSubscribed(subscription, attempt = 0) {
    const current = () => this._subscriptions.get(subscription.channel) === subscription;
    return this._ensureSubscribed(subscription).catch((error) => {
      if (!current()) return;
      error.channel = subscription.channel;
      const final = FINAL_SUBSCRIBE_ERRORS.has(error.code) && !/retry|try again/i.test(error.message);
      if (final) {
        this._subscriptions.delete(subscription.channel);
        subscription.handlers.onError?.(error, subscription);
        this._emit("error", error);
        return;
      }
      if (attempt === 0) this._emit("error", error);
      if (this.state !== "open") return; // the next connection resubscribes
      const delay = this._backoffDelay(attempt);
      // No answer in time, or `already_subscribed`: the broker may hold the subscription
      // after all; leave it first, so that the retry resumes from `since` and is confirmed.
      const leaveFirst = error.code === "timeout" || error.code === "already_subscribed";
      clearTimeout(subscription.retry);
      subscription.retry = setTimeout(async () => {
        if (!current() || this.state !== "open") return;
        if (leaveFirst) {
          await this._request({ type: "unsubscribe", channel: subscription.channel }).catch(() => {});
        }
        if (current() && this.state === "open") this._keepSubscribed(subscription, attempt + 1);
      }, delay);
    });
  }

  /** Drops the connection now: a dead network never completes the close handshake, so what a
   * close does (fail requests, back off, reconnect) happens at once. */
  _drop(code, reason) {
    const ws = this._ws;
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onclose = null;
    // Not null: the `ws` package throws an 'error' event nobody listens to (closing while
    // connecting emits one).
    ws.onerror = () => {};
    try { ws.close(code, reason); } catch { /* closing anyway */ }
    this._onClose(code, reason);
  }

  /** Stops for good after an error no retry can fix; pending work fails with it. */
  _fatal(error) {
    this._closedByUser = true;
    this._listenToNetwork(false);
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

  _scheduleRefresh(expiresAt) { scheduleRefresh(this, expiresAt); }

  _refresh(expiresAt) { return refresh(this, expiresAt); }

  _startHeartbeat() {
    this._stopHeartbeat();
    // On SSE only POSTs count as life for the broker's idle timeout: always ping there.
    if (!this.heartbeat && this.transport !== "sse") return;
    // Browsers cannot see WebSocket pings: an application ping shows the connection is alive,
    // and measures the clock offset. No answer within the request timeout: reconnect.
    const every = this._pingInterval || 15_000;
    this._heartbeatTimer = setInterval(() => {
      this.ping().catch((error) => {
        if (error.code === "timeout") this._drop(4997, "no answer to ping");
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
    for (const subscription of this._subscriptions.values()) clearTimeout(subscription.retry);
  }

  _onClose(code, reason) {
    const opened = this._ws?._opened;
    this._ws = null;
    if (!opened && this.transport === "websocket" && this.transportOption === "auto"
      && !this._websocketWorked) {
      // A WebSocket that never opened, and none ever has: after `fallbackAfter` of them in a
      // row, the network probably blocks WebSockets; use the SSE transport from now on. (Once
      // one has opened, failures are the broker's or the network's: restarts, outages.)
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
    // After a rate-limit close, wait longer (protocol §9.2).
    const delay = this._backoffDelay(this._attempt, code === 1008 ? 4 : 1);
    this._attempt += 1;
    this._reconnectTimer = setTimeout(() => this._reconnectNow(), delay);
  }

  /** The jittered exponential backoff of the `attempt`-th retry (0 first), times `factor`. */
  _backoffDelay(attempt, factor = 1) {
    const base = Math.min(this.backoff.max, this.backoff.initial * 2 ** attempt);
    return Math.min(this.backoff.max, base * factor) * (0.5 + Math.random() / 2);
  }

  _reconnectNow() {
    clearTimeout(this._reconnectTimer);
    if (this._closedByUser || this._ws) return; // closed, or an attempt is under way
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
    this._drop(4996, "dropped by the application");
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
      .then(() => this._keepSubscribed(subscription));
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
    // Active already, or unsubscribed meanwhile (a later batch, a retry, a resync): nothing.
    if (subscription.active || this._subscriptions.get(subscription.channel) !== subscription) {
      return Promise.resolve();
    }
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
      if (this._subscriptions.get(subscription.channel) === subscription) {
        subscription.applySubscribed(result, resumed);
      }
    };
    return this._request(frame, { whenOpen: false, onReply: apply });
  }

  /** Leaves a channel; its subscription is forgotten. */
  async unsubscribe(channel) {
    const subscription = this._subscriptions.get(channel);
    this._subscriptions.delete(channel);
    if (subscription) clearTimeout(subscription.retry);
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
    return placeBid(this, auctionId, amount, options);
  }

  _sendBid(bid) {
    sendBid(this, bid);
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
