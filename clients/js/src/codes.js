// The protocol's names and codes as the client knows them (docs/protocol.md §1.2, §9), and
// GavelError, which carries a code.

/** Subprotocols by format (protocol §1.2). */
export const SUBPROTOCOLS = { msgpack: "gavel.v1.msgpack", json: "gavel.v1.json" };

/**
 * Close codes the broker sends (protocol §9.2), what they mean, and whether the client
 * reconnects by itself after one.
 * @type {Record<number, {reason: string, reconnect: boolean, freshToken?: boolean}>}
 */
export const CLOSE_CODES = {
  1000: { reason: "normal", reconnect: false },
  1001: { reason: "server shutting down", reconnect: true },
  1002: { reason: "protocol error", reconnect: true },
  1006: { reason: "connection lost (no close frame)", reconnect: true },
  1007: { reason: "invalid utf-8", reconnect: true },
  1008: { reason: "rate limit exceeded", reconnect: true },
  1009: { reason: "message too big", reconnect: true },
  1011: { reason: "internal error", reconnect: true },
  4000: { reason: "idle timeout", reconnect: true },
  4001: { reason: "slow consumer", reconnect: true },
  4002: { reason: "authentication required", reconnect: true, freshToken: true },
  4003: { reason: "token expired", reconnect: true, freshToken: true },
};

/**
 * Error codes of `error` frames (protocol §9.1), plus the client's own (`timeout`,
 * `disconnected`, `closed`).
 */
export const ERROR_CODES = [
  "bad_frame", "unknown_type", "invalid_channel", "invalid_request", "forbidden",
  "read_only_channel", "not_subscribed", "already_subscribed", "too_many_subscriptions",
  "unauthenticated", "token_invalid", "token_expired", "rate_limited", "cluster_unavailable",
  "internal", "timeout", "disconnected", "closed",
];

/** An `error` frame from the broker, or a request the client gave up on. */
export class GavelError extends Error {
  /**
   * @param {string} code a code of ERROR_CODES
   * @param {string} message
   * @param {number|null} [id] the request id, when there was one
   */
  constructor(code, message, id = null) {
    super(`${code}: ${message}`);
    this.name = "GavelError";
    this.code = code;
    this.id = id;
  }
}
