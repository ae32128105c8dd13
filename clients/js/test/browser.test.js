// The demo and admin pages in a real browser: Debian's Chromium driven by playwright-core (no
// browser download), against a real broker started with --demo. Everything the pages show
// comes from the broker's frames and its bid log.

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { chromium } from "playwright-core";

import { API_KEY, Broker } from "./broker.js";

const CHROMIUM = process.env.GAVEL_CHROMIUM || "/usr/bin/chromium";

let broker;
let browser;

before(async () => {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`${CHROMIUM} is missing: sudo apt-get install -y chromium (scripts/test does it as root)`);
  }
  broker = await Broker.start(["--demo"]);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
});

after(async () => {
  await browser?.close();
  await broker?.close();
});

/** A page of the demo as `user`, in its own browser context, ready (subscribed). */
async function bidder(user, auction, { init } = {}) {
  const context = await browser.newContext({ viewport: { width: 390, height: 844 } }); // a phone
  if (init) await context.addInitScript(init);
  const page = await context.newPage();
  page.on("pageerror", (error) => console.error(`[${user}] page error:`, error));
  await page.goto(`${broker.httpUrl}/demo/?user=${user}#${auction}`);
  await page.waitForSelector("body[data-ready=true]", { timeout: 15_000 });
  return { context, page };
}

const price = (page) => page.locator("[data-testid=price]").getAttribute("data-amount");
const leader = (page) => page.locator("[data-testid=leader]").textContent();
const historyAmounts = (page) => page.$$eval("[data-testid=history] tr", (rows) => rows.map((r) => Number(r.dataset.amount)));

async function priceIs(page, amount) {
  await page.waitForFunction(
    (want) => document.querySelector("[data-testid=price]")?.dataset.amount === String(want),
    amount,
    { timeout: 10_000 },
  );
}

test("two bidders in two browsers bid against each other and both pages agree", async () => {
  await broker.createAuction("b1");
  const ann = await bidder("ann", "b1");
  const ben = await bidder("ben", "b1");
  await ann.page.click("[data-testid=quick-bid-0]"); // the starting price, 100
  await priceIs(ben.page, 100);
  await ben.page.click("[data-testid=quick-bid-1]"); // two increments up: 120
  await priceIs(ann.page, 120);
  await ann.page.click("[data-testid=quick-bid-0]"); // the next minimum: 130
  await priceIs(ben.page, 130);
  for (const { page } of [ann, ben]) {
    assert.equal(await price(page), "130");
    assert.equal(await leader(page), "ann");
    assert.deepEqual(await historyAmounts(page), [130, 120, 100]);
  }
  await ann.context.close();
  await ben.context.close();
});

test("a page offline for 10 s during bidding comes back recovered and shows exactly the log", async () => {
  await broker.createAuction("b2");
  const cleo = await bidder("cleo", "b2");
  const dan = await bidder("dan", "b2");
  await cleo.page.click("[data-testid=quick-bid-0]");
  await priceIs(dan.page, 100);

  await dan.context.setOffline(true);
  await dan.page.waitForFunction(() => window.gavelClient.state !== "open", null, { timeout: 5_000 });
  const offlineAt = Date.now();
  for (let i = 0; i < 4; i++) {
    await cleo.page.click("[data-testid=quick-bid-0]");
    await priceIs(cleo.page, 110 + 10 * i);
  }
  await new Promise((resolve) => setTimeout(resolve, Math.max(0, 10_000 - (Date.now() - offlineAt))));
  await dan.context.setOffline(false);
  await priceIs(dan.page, 140);
  await dan.page.waitForSelector("#lot[data-recovered=true]", { timeout: 10_000 });
  const log = await broker.bids("b2");
  assert.deepEqual(await historyAmounts(dan.page), log.map((b) => b.amount).reverse());
  assert.deepEqual(await historyAmounts(dan.page), [140, 130, 120, 110, 100]);
  await cleo.context.close();
  await dan.context.close();
});

test("with WebSockets blocked the page falls back to SSE, bids, and recovers after losing its network", async () => {
  await broker.createAuction("b3");
  // A network that refuses WebSocket upgrades: every attempt fails before it opens.
  const blocked = () => {
    window.WebSocket = class {
      constructor() {
        this.readyState = 0;
        setTimeout(() => { this.readyState = 3; this.onerror?.({}); this.onclose?.({ code: 1006, reason: "" }); }, 20);
      }
      send() {}
      close() {}
    };
  };
  const eve = await bidder("eve", "b3", { init: blocked });
  const fay = await bidder("fay", "b3");
  const connection = eve.page.locator("[data-testid=connection]");
  assert.equal(await connection.getAttribute("data-transport"), "sse");
  await eve.page.click("[data-testid=quick-bid-0]");
  await priceIs(fay.page, 100);
  await fay.page.click("[data-testid=quick-bid-0]");
  await priceIs(eve.page, 110);
  assert.equal(await leader(eve.page), "fay");

  // The SSE page loses its network while bidding goes on, and recovers every bid.
  await eve.context.setOffline(true);
  await eve.page.waitForFunction(() => window.gavelClient.state !== "open", null, { timeout: 5_000 });
  for (const amount of [120, 130, 140]) {
    await fay.page.click("[data-testid=quick-bid-0]");
    await priceIs(fay.page, amount);
  }
  await eve.context.setOffline(false);
  await priceIs(eve.page, 140);
  await eve.page.waitForSelector("#lot[data-recovered=true]", { timeout: 10_000 });
  assert.equal(await connection.getAttribute("data-transport"), "sse");
  const log = await broker.bids("b3");
  assert.deepEqual(await historyAmounts(eve.page), log.map((b) => b.amount).reverse());
  await eve.context.close();
  await fay.context.close();
});

test("the countdown follows a soft-close extension", async () => {
  const now = Date.now();
  await broker.createAuction("b4", {
    ends_at: now + 30_000,
    soft_close: { window_ms: 60_000, extend_ms: 120_000 },
  });
  const gil = await bidder("gil", "b4");
  const countdown = gil.page.locator("[data-testid=countdown]");
  const before = Number(await countdown.getAttribute("data-ends-at"));
  await gil.page.click("[data-testid=quick-bid-0]");
  await gil.page.waitForFunction(
    (end) => Number(document.querySelector("[data-testid=countdown]").dataset.endsAt) > end,
    before,
    { timeout: 10_000 },
  );
  const after = Number(await countdown.getAttribute("data-ends-at"));
  assert.ok(after >= now + 120_000, `extended to ${after - now} ms from the start`);
  assert.match(await countdown.textContent(), /ends in [12]:\d\d/);
  await gil.context.close();
});

test("the admin page ends an auction and every page shows the winner", async () => {
  await broker.createAuction("b5");
  const hal = await bidder("hal", "b5");
  const ida = await bidder("ida", "b5");
  await hal.page.click("[data-testid=quick-bid-0]");
  await priceIs(ida.page, 100);

  const admin = await browser.newContext();
  const page = await admin.newPage();
  await page.goto(`${broker.httpUrl}/admin/`);
  await page.fill("[data-testid=key]", API_KEY);
  await page.press("[data-testid=key]", "Enter");
  await page.waitForSelector("tr[data-auction=b5][data-status=active]", { timeout: 10_000 });
  assert.ok(Number(await page.textContent("[data-testid=connections]")) >= 2);
  await page.click("[data-testid=end-b5]");
  await page.waitForSelector("tr[data-auction=b5][data-status=ended]", { timeout: 10_000 });

  for (const { page: lotPage } of [hal, ida]) {
    await lotPage.waitForSelector("[data-testid=winner][data-winner=hal]", { timeout: 10_000 });
    assert.match(await lotPage.textContent("[data-testid=winner]"), /Won by hal/);
    assert.equal(await lotPage.textContent("[data-testid=status]"), "ended");
  }
  await admin.close();
  await hal.context.close();
  await ida.context.close();
});

test("a buy-now click ends the auction and the other page shows the buyer as winner", async () => {
  await broker.createAuction("b6", { buy_now: 500 });
  const jon = await bidder("jon", "b6");
  const kim = await bidder("kim", "b6");
  await jon.page.click("[data-testid=buy-now]");
  for (const { page } of [jon, kim]) {
    await page.waitForSelector("[data-testid=winner][data-winner=jon]", { timeout: 10_000 });
    assert.equal(await price(page), "500");
    assert.equal(await page.locator("[data-testid=buy-now]").count(), 0, "no buy-now once sold");
  }
  await jon.context.close();
  await kim.context.close();
});
