// The JavaScript client against a real broker (started per file on a free loopback port):
// bids, recovery after a dropped connection and after a broker restart, retries, both
// encodings, typed errors, and the conversation features.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";

import { readFileSync } from "node:fs";

import { CLOSE_CODES, ERROR_CODES, GavelClient, GavelError } from "../src/index.js";
import { Broker, token } from "./broker.js";

let broker;
const clients = [];

before(async () => {
  broker = await Broker.start();
});

after(async () => {
  for (const client of clients) client.close();
  await broker.close();
});

function client(user, options = {}) {
  const made = new GavelClient({
    url: broker.wsUrl,
    token: user ? () => token(user, options.claims || {}) : undefined,
    WebSocket,
    backoff: { initial: 100, max: 1000 },
    requestTimeout: 5000,
    ...options,
  });
  clients.push(made);
  return made;
}

/** Resolves when `predicate()` holds, polling; fails after `ms`. */
async function until(predicate, ms = 5000, what = "condition") {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** Resolves with the next value of a client event. */
const next = (emitter, name) => new Promise((resolve) => {
  const off = emitter.on(name, (value) => { off(); resolve(value); });
});

test("two bidders bid against each other and both see the same price and leader", async () => {
  await broker.createAuction("js1");
  const alice = client("alice");
  const bob = client("bob");
  await Promise.all([alice.connect(), bob.connect()]);
  const seen = { alice: [], bob: [] };
  const subs = await Promise.all([
    alice.subscribe("auction:js1", { onEvent: (e) => seen.alice.push(e) }),
    bob.subscribe("auction:js1", { onEvent: (e) => seen.bob.push(e) }),
  ]);
  assert.equal(subs[0].state.starting_price, 100);
  assert.equal(subs[0].state.status, "active");

  const first = await alice.placeBid("js1", 100);
  assert.equal(first.kind, "bid_accepted");
  const second = await bob.placeBid("js1", 110);
  assert.equal(second.kind, "bid_accepted");
  const low = await alice.placeBid("js1", 110);
  assert.equal(low.kind, "bid_rejected");
  assert.equal(low.reason, "too_low");
  assert.equal(low.min_amount, 120);

  const placed = (events) => events.filter((e) => e.event === "bid_placed").map((e) => [e.data.amount, e.data.bidder]);
  await until(() => placed(seen.alice).length === 2 && placed(seen.bob).length === 2, 5000, "both bids seen");
  assert.deepEqual(placed(seen.alice), [[100, "alice"], [110, "bob"]]);
  assert.deepEqual(placed(seen.bob), placed(seen.alice));
  // Viewer counts arrive for the room (two connections).
  await until(() => subs[1].viewers?.connections === 2, 5000, "viewer counts");
});

test("a proxy bid (maxAmount) answers a lower bid at once with an automatic bid", async () => {
  await broker.createAuction("jsproxy");
  const alice = client("alice");
  const bob = client("bob");
  await Promise.all([alice.connect(), bob.connect()]);
  const seen = [];
  await bob.subscribe("auction:jsproxy", { onEvent: (e) => seen.push(e) });
  const mine = await alice.placeBid("jsproxy", 100, { maxAmount: 500 });
  assert.equal(mine.kind, "bid_accepted");
  assert.equal(mine.leading, true);
  assert.equal(mine.max_amount, 500);
  const beaten = await bob.placeBid("jsproxy", 110);
  assert.equal(beaten.kind, "bid_accepted");
  assert.equal(beaten.leading, false);
  assert.equal(beaten.price, 120);
  const placed = () => seen.filter((e) => e.event === "bid_placed").map((e) => [e.data.amount, e.data.bidder, e.data.automatic]);
  await until(() => placed().length === 3, 5000, "three bids seen");
  assert.deepEqual(placed(), [[100, "alice", false], [110, "bob", false], [120, "alice", true]]);
  // Look at values, not at the text: a timestamp may well contain the digits 500.
  const leaks = [];
  const walk = (value, path) => {
    if (value === 500) leaks.push(path);
    if (value && typeof value === "object") {
      for (const [key, inner] of Object.entries(value)) {
        if (key === "max_amount" || key === "maxAmount") leaks.push(`${path}.${key}`);
        walk(inner, `${path}.${key}`);
      }
    }
  };
  walk(seen, "seen");
  assert.deepEqual(leaks, [], "the maximum is never broadcast");
});

test("a dropped connection resubscribes with since and epoch and replays every missed bid", async () => {
  await broker.createAuction("js2");
  const viewer = client("viewer", { backoff: { initial: 600, max: 1000 } });
  const bidder = client("bidder");
  await Promise.all([viewer.connect(), bidder.connect()]);
  const events = [];
  const seqs = [];
  const recoveries = [];
  const sub = await viewer.subscribe("auction:js2", {
    onEvent: (e) => {
      seqs.push(e.seq);
      if (e.event === "bid_placed") events.push(e);
    },
    onRecovered: (r) => recoveries.push(r),
  });
  await bidder.placeBid("js2", 100);
  await until(() => events.length === 1, 5000, "the first bid");

  const reconnected = next(viewer, "reconnected");
  viewer.dropConnection();
  // While the viewer is away (its backoff is at least 300 ms), three more bids.
  for (const amount of [110, 120, 130]) {
    assert.equal((await bidder.placeBid("js2", amount)).kind, "bid_accepted");
  }
  await reconnected;
  await until(() => events.length === 4, 5000, "the replayed bids");
  assert.deepEqual(events.map((e) => e.data.amount), [100, 110, 120, 130]);
  // Every event of the room (bids and leaderboard updates) exactly once, without a gap.
  assert.deepEqual(seqs, seqs.map((_, i) => seqs[0] + i));
  assert.equal(recoveries.length, 1);
  assert.equal(recoveries[0].recovered, true);
  assert.ok(recoveries[0].replayed >= 3, `replayed ${recoveries[0].replayed}`);
  await until(() => sub.lastSeq === seqs.at(-1), 5000, "the last seq");
  assert.equal(sub.state.price, 130);
});

test("a bid placed while disconnected is sent after the reconnect, and a retry is never placed twice", async () => {
  await broker.createAuction("js3");
  const bidder = client("carol", { backoff: { initial: 300, max: 600 } });
  await bidder.connect();
  bidder.dropConnection();
  await until(() => bidder.state === "reconnecting", 2000, "reconnecting");
  const answer = await bidder.placeBid("js3", 100, { requestId: "carol-1" });
  assert.equal(answer.kind, "bid_accepted");
  assert.equal(answer.request_id, "carol-1");
  // The same request id again (as after a lost reply): the first outcome, not a second bid.
  const again = await bidder.placeBid("js3", 100, { requestId: "carol-1" });
  assert.deepEqual(again, answer);
  // The same request id twice at once (a retry while the first is unanswered): one bid, and
  // both callers get its answer.
  const [one, two] = await Promise.all([
    bidder.placeBid("js3", 110, { requestId: "carol-2" }),
    bidder.placeBid("js3", 110, { requestId: "carol-2" }),
  ]);
  assert.equal(one.kind, "bid_accepted");
  assert.deepEqual(two, one);
  const response = await fetch(`${broker.httpUrl}/api/auctions/js3`, {
    headers: { authorization: "Bearer js-client-test-api-key-0123456789" },
  });
  const auction = await response.json();
  assert.equal(auction.bid_count, 2);
});

test("after a broker restart the client comes back with recovered: false and the durable state", async () => {
  await broker.createAuction("js4");
  const viewer = client("dave");
  await viewer.connect();
  const recoveries = [];
  await viewer.subscribe("auction:js4", { onRecovered: (r) => recoveries.push(r) });
  assert.equal((await viewer.placeBid("js4", 100)).kind, "bid_accepted");
  const closes = [];
  viewer.on("close", (c) => closes.push(c.code));
  const reconnected = next(viewer, "reconnected");
  await broker.restart();
  await reconnected;
  await until(() => recoveries.length === 1, 5000, "the resubscription");
  assert.equal(closes[0], 1001, "the broker said it was shutting down");
  // A new process is a new epoch: nothing can be replayed, and the state comes from the log.
  assert.equal(recoveries[0].recovered, false);
  assert.equal(recoveries[0].state.price, 100);
  assert.equal(recoveries[0].state.leader, "dave");
});

test("the JSON encoding works the same", async () => {
  await broker.createAuction("js5");
  const viewer = client("erin", { format: "json" });
  await viewer.connect();
  const events = [];
  const sub = await viewer.subscribe("auction:js5", {
    onEvent: (e) => { if (e.event === "bid_placed") events.push(e); },
  });
  assert.equal(sub.state.auction_id, "js5");
  assert.equal((await viewer.placeBid("js5", 150)).kind, "bid_accepted");
  await until(() => events.length === 1, 5000, "the event");
  assert.equal(events[0].data.amount, 150);
  assert.ok((await viewer.ping()) >= 0);
});

test("errors are typed: forbidden, read-only channels, bad tokens", async () => {
  const frank = client("frank");
  await frank.connect();
  await assert.rejects(frank.subscribe("user:someone-else"), (e) => e instanceof GavelError && e.code === "forbidden");
  await frank.subscribe("auction:js-none");
  await assert.rejects(frank.publish("auction:js-none", { text: "hi" }), (e) => e.code === "read_only_channel");
  await assert.rejects(frank.typing("conversation:nope", true), (e) => e.code === "not_subscribed");

  // A token the broker refuses for good: connect() fails with its code and the client stops
  // (no reconnect loop).
  const forger = new GavelClient({
    url: broker.wsUrl, WebSocket, token: "not-a-jwt", backoff: { initial: 100, max: 200 },
  });
  clients.push(forger);
  await assert.rejects(forger.connect(), (e) => e.code === "token_invalid");
  assert.equal(forger.state, "closed");
  await assert.rejects(forger.ping(), (e) => e.code === "closed");
});

test("conversations: messages, typing, read receipts, presence and joined", async () => {
  const claims = { channels: ["conversation:c1"] };
  const gina = client("gina", { claims });
  const hank = client("hank", { claims });
  await Promise.all([gina.connect(), hank.connect()]);
  const ginaSaw = { events: [], typing: [], joined: [] };
  const hankSaw = { events: [], typing: [] };
  await gina.subscribe("conversation:c1", {
    onEvent: (e) => ginaSaw.events.push(e),
    onTyping: (t) => ginaSaw.typing.push(t),
    onJoined: (j) => ginaSaw.joined.push(j.user),
  });
  await hank.subscribe("conversation:c1", {
    onEvent: (e) => hankSaw.events.push(e),
    onTyping: (t) => hankSaw.typing.push(t),
  });
  await until(() => ginaSaw.joined.includes("hank"), 5000, "joined");

  await hank.typing("conversation:c1", true);
  await until(() => ginaSaw.typing.length === 1, 5000, "typing");
  assert.equal(ginaSaw.typing[0].user, "hank");
  assert.equal(hankSaw.typing.length, 0, "no one hears their own typing");

  const sent = await hank.publish("conversation:c1", { text: "still available?" });
  assert.equal(sent.kind, "published");
  await until(() => ginaSaw.events.length === 1, 5000, "the message");
  assert.equal(ginaSaw.events[0].from, "hank");
  assert.equal(ginaSaw.events[0].data.text, "still available?");

  await gina.read("conversation:c1", sent.seq);
  await until(() => hankSaw.events.some((e) => e.event === "read"), 5000, "the receipt");
  assert.equal(hankSaw.events.find((e) => e.event === "read").data.seq, sent.seq);

  const presence = await gina.presence("conversation:c1");
  assert.deepEqual(presence.users, ["gina", "hank"]);
  assert.equal(presence.viewers.connections, 2);
});

test("the SSE transport carries the same frames: bids, viewer counts, recovery after a drop", async () => {
  await broker.createAuction("js6");
  const viewer = client("ivan", { transport: "sse", backoff: { initial: 600, max: 1000 } });
  const bidder = client("judy");
  await Promise.all([viewer.connect(), bidder.connect()]);
  assert.equal(viewer.transport, "sse");
  const seqs = [];
  const amounts = [];
  const recoveries = [];
  const sub = await viewer.subscribe("auction:js6", {
    onEvent: (e) => {
      seqs.push(e.seq);
      if (e.event === "bid_placed") amounts.push(e.data.amount);
    },
    onRecovered: (r) => recoveries.push(r),
  });
  // Bids from the SSE side are POSTed frames, answered on the stream.
  assert.equal((await viewer.placeBid("js6", 100)).kind, "bid_accepted");
  await until(() => amounts.length === 1, 5000, "the first bid");
  await until(() => sub.viewers?.connections === 1, 5000, "viewer counts over SSE");

  const reconnected = next(viewer, "reconnected");
  viewer.dropConnection();
  for (const amount of [110, 120]) {
    assert.equal((await bidder.placeBid("js6", amount)).kind, "bid_accepted");
  }
  await reconnected;
  await until(() => amounts.length === 3, 5000, "the replayed bids");
  assert.deepEqual(amounts, [100, 110, 120]);
  assert.deepEqual(seqs, seqs.map((_, i) => seqs[0] + i));
  assert.equal(recoveries[0].recovered, true);
  assert.equal(viewer.transport, "sse");
});

test("when WebSockets are blocked the client falls back to SSE by itself and says so", async () => {
  await broker.createAuction("js7");
  // A network that refuses WebSocket upgrades: every attempt closes before it opens.
  class BlockedWebSocket {
    constructor() {
      this.readyState = 0;
      setTimeout(() => { this.readyState = 3; this.onclose?.({ code: 1006, reason: "" }); }, 5);
    }
    send() {}
    close() {}
  }
  const viewer = client("kate", { WebSocket: BlockedWebSocket, backoff: { initial: 50, max: 100 } });
  const switched = next(viewer, "transport");
  await viewer.connect();
  assert.deepEqual((await switched).transport, "sse");
  assert.equal(viewer.transport, "sse");
  const sub = await viewer.subscribe("auction:js7");
  assert.equal(sub.state.auction_id, "js7");
  assert.equal((await viewer.placeBid("js7", 100)).kind, "bid_accepted");
});

test("every error code and close code of docs/protocol.md §9 is known to the client", () => {
  const doc = readFileSync(new URL("../../../docs/protocol.md", import.meta.url), "utf8");
  const section = (from, to) => doc.slice(doc.indexOf(from), doc.indexOf(to));
  const errors = [...section("### 9.1 Error codes", "### 9.2").matchAll(/^\| `([a-z_]+)`/gm)].map((m) => m[1]);
  const closes = [...section("### 9.2 Close codes", "### 9.3").matchAll(/^\| (\d{4}) /gm)].map((m) => Number(m[1]));
  assert.ok(errors.length >= 15 && closes.length >= 11, "the tables were found");
  for (const code of errors) assert.ok(ERROR_CODES.includes(code), `error code ${code}`);
  for (const code of closes) assert.ok(code in CLOSE_CODES, `close code ${code}`);
});
