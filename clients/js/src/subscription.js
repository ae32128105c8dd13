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
    /** @type {object|null} the channel's state (an auction's snapshot), as of lastSeq */
    this.state = null;
    /** @type {object|null} the latest viewer counts */
    this.viewers = null;
    /** whether the broker has confirmed this subscription on the current connection */
    this.active = false;
    /** @type {Promise<unknown>|null} the `subscribe` in flight, if any */
    this.inflight = null;
  }

  /** Leaves the channel. */
  async unsubscribe() {
    return this.client.unsubscribe(this.channel);
  }
}
