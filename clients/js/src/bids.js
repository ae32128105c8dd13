// Bids as the client keeps them until the broker answers: each sent again with its
// `request_id` after every reconnect, after a frame dropped without an answer, and after a
// transient rejection, so that a bid is placed at most once (protocol §4.10, Idempotency).

import { GavelError } from "./codes.js";

/** Bid rejections worth resending with the same `request_id` (protocol §4.10). */
const TRANSIENT_REJECTIONS = new Set(["rate_limited", "unavailable", "cluster_unavailable"]);

/** See GavelClient.placeBid. @param {import("./index.js").GavelClient} client */
export function placeBid(client, auctionId, amount, options = {}) {
  if (client.state === "closed") {
    return Promise.reject(new GavelError("closed", "the client is closed"));
  }
  const requestId = options.requestId
    || `${client._clientId}-${Date.now().toString(36)}-${++client._bidCounter}`;
  const timeout = options.timeout ?? 60_000;
  return new Promise((resolve, reject) => {
    const bid = {
      auctionId, amount, maxAmount: options.maxAmount, requestId, resolve, reject,
      retriesLeft: options.retries ?? 3, attempts: 0, timer: null,
    };
    bid.timer = setTimeout(() => {
      if (client._bids.get(requestId) === bid) client._bids.delete(requestId);
      bid.reject(new GavelError("timeout", `no answer to bid ${requestId} within ${timeout} ms`));
    }, timeout);
    bid.resolve = (result) => { clearTimeout(bid.timer); clearTimeout(bid.retry); resolve(result); };
    bid.reject = (error) => { clearTimeout(bid.timer); clearTimeout(bid.retry); reject(error); };
    const earlier = client._bids.get(requestId);
    if (earlier) {
      // The same request_id again while the first is unanswered: one bid, two callers.
      earlier.resolve = ((first) => (result) => { first(result); bid.resolve(result); })(earlier.resolve);
      earlier.reject = ((first) => (error) => { first(error); bid.reject(error); })(earlier.reject);
      return;
    }
    client._bids.set(requestId, bid);
    sendBid(client, bid);
  });
}

/** Sends one attempt of `bid` (unless answered, given up, or the client is not open). */
export function sendBid(client, bid) {
  if (client._bids.get(bid.requestId) !== bid) return; // answered or given up meanwhile
  if (client.state !== "open") return; // sent at the next connect
  const id = client._nextId++;
  bid.attempts += 1;
  const current = () => client._bids.get(bid.requestId) === bid;
  const again = (delay) => {
    clearTimeout(bid.retry);
    bid.retry = setTimeout(() => sendBid(client, bid), delay);
  };
  // A frame can be dropped without a reply (a rate-limited message is answered with an
  // id-less error): without an answer in time, send the same request_id again.
  const timer = setTimeout(() => {
    if (client._pending.get(id)?.bid === bid) client._pending.delete(id);
    if (current()) sendBid(client, bid);
  }, client.requestTimeout);
  client._pending.set(id, {
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
      client._bids.delete(bid.requestId);
      bid.resolve(result);
    },
    reject: (error) => {
      if (!current()) return;
      // During a token's grace period (the refresh is under way) or a rate limit: later.
      if (error.code === "token_expired" || error.code === "rate_limited") {
        again(1000);
        return;
      }
      client._bids.delete(bid.requestId);
      bid.reject(error);
    },
  });
  client._send({
    type: "place_bid", id, auction_id: bid.auctionId, amount: bid.amount, request_id: bid.requestId,
    ...(bid.maxAmount === undefined ? {} : { max_amount: bid.maxAmount }),
  });
}
