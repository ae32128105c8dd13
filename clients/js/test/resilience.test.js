// The client when things go wrong, against real brokers (one per test, on free loopback ports):
// a broker that stops answering, a reconnect with many subscriptions, a broker restart, a
// long-lived token, an auction archived while the client was away.

import { after, test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";

import { GavelClient } from "../src/index.js";
import { API_KEY, Broker, token } from "./broker.js";

const cleanup = [];
after(async () => {
  for (const step of cleanup.reverse()) await step();
});

async function broker(extra = []) {
  const started = await Broker.start(extra);
  cleanup.push(() => started.close());
  return started;
}

function client(at, user, options = {}) {
  const made = new GavelClient({
    url: at.wsUrl,
    token: () => token(user, {}, options.ttl ?? 3600),
    WebSocket,
    backoff: { initial: 100, max: 1000 },
    requestTimeout: 2000,
    ...options,
  });
  cleanup.push(() => made.close());
  return made;
}

/** A broker (with `extra` flags) and a client of `user` connected to it. */
async function connected(user, extra = [], options = {}) {
  const at = await broker(extra);
  const viewer = client(at, user, options);
  await viewer.connect();
  return { at, viewer };
}

async function until(predicate, ms, what) {
  const deadline = Date.now() + ms;
  while (!predicate()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function api(at, method, path, body) {
  const response = await fetch(`${at.httpUrl}${path}`, {
    method,
    headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: response.status, body: await response.json().catch(() => null) };
}

test("a broker that stops answering is left at the ping timeout, not after the close handshake", async () => {
  const { at, viewer } = await connected("ann", ["--ping-interval", "1s", "--idle-timeout", "3s"],
    { requestTimeout: 1000 });
  // Frozen: TCP stays up, nothing is answered, a close handshake never completes (Node's `ws`
  // gives up on one after 30 s, Chromium after 60 s).
  at.child.kill("SIGSTOP");
  cleanup.push(() => at.child.kill("SIGCONT"));
  const frozenAt = Date.now();
  await until(() => viewer.state === "reconnecting", 15_000, "the client to give the connection up");
  const took = Date.now() - frozenAt;
  assert.ok(took < 15_000, `gave up after ${took} ms`);
  at.child.kill("SIGCONT");
  await until(() => viewer.state === "open", 15_000, "the reconnect");
});

test("after a reconnect every one of 110 subscriptions is back, paced under the broker's rate limit", async () => {
  const { at, viewer } = await connected("bob");
  const got = new Set();
  for (let i = 0; i < 110; i += 1) {
    if (i > 0 && i % 40 === 0) await sleep(1000); // under the burst of 100 messages
    await viewer.subscribe(`auction:lot${i}`, { onEvent: (e) => got.add(e.channel) });
  }
  const errors = [];
  viewer.on("error", (error) => errors.push(error.code));
  viewer.dropConnection();
  await until(() => [...viewer._subscriptions.values()].every((s) => s.active), 20_000, "every resubscribe");
  for (let i = 0; i < 110; i += 1) {
    const { status } = await api(at, "POST", "/api/publish", { channel: `auction:lot${i}`, event: "note", data: { i } });
    assert.equal(status, 200);
  }
  await until(() => got.size === 110, 10_000, "an event in every room");
  assert.deepEqual(errors, [], "no resubscribe was refused");
});

test("a broker down for a while (kill -9, back 2 s later) does not move the client to SSE", async () => {
  const { at, viewer } = await connected("cat");
  const switched = [];
  viewer.on("transport", (change) => switched.push(change));
  const reconnected = new Promise((resolve) => viewer.on("reconnected", resolve));
  const exited = new Promise((resolve) => at.child.once("exit", resolve));
  at.child.kill("SIGKILL");
  await exited;
  await sleep(2000); // several reconnect attempts fail meanwhile
  await at.run();
  await reconnected;
  assert.equal(viewer.transport, "websocket");
  assert.deepEqual(switched, []);
});

test("a token valid for 30 days is sent once, not refreshed in a loop", async () => {
  const at = await broker();
  let auths = 0;
  class Counting extends WebSocket {
    send(data) {
      if (String(data).includes('"type":"auth"')) auths += 1;
      super.send(data);
    }
  }
  const viewer = client(at, "dan", { ttl: 30 * 24 * 3600, WebSocket: Counting, format: "json" });
  await viewer.connect();
  await viewer.subscribe("user:dan");
  await sleep(1000);
  assert.equal(auths, 1);
  assert.equal(viewer.state, "open");
});

test("an auction archived while the client was away comes back without its stale state", async () => {
  const at = await broker(["--archive-after", "1s", "--history-ttl", "1s"]);
  await at.createAuction("gone");
  // Away for at least 4 s after a drop: long enough for the auction to end and be archived.
  const viewer = client(at, "eve", { backoff: { initial: 8000, max: 8000 } });
  await viewer.connect();
  const recoveries = [];
  const sub = await viewer.subscribe("auction:gone", { onRecovered: (r) => recoveries.push(r) });
  assert.equal(sub.state.status, "active");
  viewer.dropConnection();
  assert.equal((await api(at, "POST", "/api/auctions/gone/end")).status, 200);
  await until(() => recoveries.length === 1, 20_000, "the recovery");
  assert.equal(recoveries[0].recovered, false);
  assert.equal(recoveries[0].state, null, "not the state from before the drop");
  assert.equal(sub.state, null);
});

test("a token refresh that fails is tried again within the grace, not left to a 4003", async () => {
  const at = await broker(["--token-grace", "8s"]);
  let calls = 0;
  const viewer = client(at, "gus", {
    token: () => {
      calls += 1;
      if (calls === 2 || calls === 3) throw new Error("token endpoint down");
      return token("gus", {}, 4);
    },
  });
  const closes = [];
  let authenticated = 0;
  viewer.on("close", (close) => closes.push(close.code));
  viewer.on("authenticated", () => { authenticated += 1; });
  viewer.on("error", () => {});
  await viewer.connect();
  await until(() => authenticated === 2, 20_000, "a refresh that succeeds");
  assert.deepEqual(closes, [], "the connection stayed");
});

test("a refreshed token that drops a conversation ends that subscription and says so", async () => {
  const at = await broker();
  let calls = 0;
  const viewer = client(at, "hal", {
    token: () => {
      calls += 1;
      const channels = calls === 1 ? ["conversation:c1", "conversation:c2"] : ["conversation:c1"];
      return token("hal", { channels }, calls === 1 ? 3 : 3600);
    },
  });
  viewer.on("error", () => {});
  await viewer.connect();
  const ended = [];
  const kept = await viewer.subscribe("conversation:c1");
  await viewer.subscribe("conversation:c2", { onError: (error, sub) => ended.push([error.code, sub.channel]) });
  await until(() => ended.length === 1, 10_000, "the refresh");
  assert.deepEqual(ended, [["forbidden", "conversation:c2"]]);
  assert.equal(viewer._subscriptions.has("conversation:c2"), false);
  assert.equal(kept.active, true);
});

test("dropping a connection that is still opening does not crash (Node's ws emits an error)", async () => {
  const { at, viewer } = await connected("ida");
  // Frozen: the next connection's upgrade is never answered, so it stays opening.
  at.child.kill("SIGSTOP");
  cleanup.push(() => at.child.kill("SIGCONT"));
  viewer.dropConnection();
  await until(() => viewer._ws && viewer._ws.readyState === 0, 5000, "a connection opening");
  viewer.dropConnection();
  await sleep(200);
  at.child.kill("SIGCONT");
  await until(() => viewer.state === "open", 15_000, "the reconnect");
});

test("a channel left while the resubscribes are under way is not subscribed again", async () => {
  const { at, viewer } = await connected("jon");
  for (let i = 0; i < 45; i += 1) await viewer.subscribe(`auction:row${i}`);
  const reconnected = new Promise((resolve) => viewer.on("reconnected", resolve));
  viewer.dropConnection();
  await reconnected;
  // Left before its batch (the second, a second after the first) is sent.
  await viewer.unsubscribe("auction:row44");
  await until(() => [...viewer._subscriptions.values()].every((s) => s.active), 10_000, "the others back");
  await sleep(1500);
  const { body } = await api(at, "GET", "/api/rooms/auction:row44");
  assert.equal(body?.viewers?.connections ?? 0, 0, JSON.stringify(body));
  // And subscribing to it again works (the broker does not hold it already).
  await viewer.subscribe("auction:row44");
});

test("a malformed URL is refused at once", () => {
  assert.throws(() => new GavelClient({ url: "127.0.0.1:7700/ws", WebSocket }), TypeError);
});

test("a bid after close() is refused at once with `closed`", async () => {
  const { viewer: bidder } = await connected("fay");
  bidder.close();
  await assert.rejects(bidder.placeBid("x", 100, { timeout: 60_000 }), { code: "closed" });
});
