// A subscription to one channel, as the client keeps it across reconnects.

/** A subscription to one channel; kept across reconnects. */
export class Subscription {
  /**
   * @param {import("./index.js").GavelClient} client
   * @param {string} channel
   * @param {import("./index.d.ts").SubscriptionHandlers} handlers
   */
  constructor(client, channel, handlers) {
    this.client = client;
    this.channel = channel;
    this.handlers = handlers;
    /** @type {number|null} the room epoch of the last `subscribed` reply */
    this.epoch = null;
    /** the seq of the last event applied */
    this.lastSeq = 0;
    /** @type {object|null} the channel's state (an auction's snapshot) as of the last
     * `subscribed` reply (events do not update it); null for an archived auction */
    this.state = null;
    /** @type {object|null} the latest viewer counts */
    this.viewers = null;
    /** whether the broker has confirmed this subscription on the current connection */
    this.active = false;
    /** @type {Promise<unknown>|null} the `subscribe` in flight, if any */
    this.inflight = null;
    /** the timer of the next resubscribe attempt, after one failed */
    this.retry = null;
  }

  /** Leaves the channel. */
  async unsubscribe() {
    return this.client.unsubscribe(this.channel);
  }

  /**
   * Takes in a `subscribed` reply (protocol §6.5); `resumed`: it was asked with `since`.
   * @param {import("./index.d.ts").SubscribedResult} result
   * @param {boolean} resumed
   */
  applySubscribed(result, resumed) {
    this.epoch = result.epoch;
    this.viewers = result.viewers;
    if ("state" in result) this.state = result.state ?? null;
    if (result.recovered === false) {
      // The history cannot prove it has every event missed: start over from the reply (an
      // archived auction has no state any more: null, never the state from before).
      this.lastSeq = result.seq;
      this.state = result.state ?? result.snapshot?.state ?? null;
      this.viewers = result.snapshot?.viewers ?? this.viewers;
    } else if (!resumed) {
      this.lastSeq = result.seq;
    }
    // With recovered: true, lastSeq stays: the replayed events follow and advance it.
    this.active = true;
    this.handlers.onSubscribed?.(result, this);
    if (resumed) {
      this.handlers.onRecovered?.({
        recovered: result.recovered === true,
        replayed: result.replayed ?? 0,
        snapshot: result.snapshot ?? null,
        state: this.state,
      }, this);
    }
  }
}
