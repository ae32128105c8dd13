// Starts a real gavel-broker (the binary cargo built) on a free loopback port for the tests,
// and signs tokens for it. No mocks: the client talks to the broker over real sockets.

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

export const SECRET = "js-client-test-secret-0123456789";
export const API_KEY = "js-client-test-api-key-0123456789";

const here = dirname(fileURLToPath(import.meta.url));
const BINARY = process.env.GAVEL_BROKER_BIN || join(here, "..", "..", "..", "target", "debug", "gavel-broker");

function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

const b64url = (value) => Buffer.from(value).toString("base64url");

/** An HS256 token for `sub`, valid `ttl` seconds, with optional claims. */
export function token(sub, claims = {}, ttl = 3600) {
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const payload = b64url(JSON.stringify({ sub, exp: Math.floor(Date.now() / 1000) + ttl, ...claims }));
  const signature = createHmac("sha256", SECRET).update(`${header}.${payload}`).digest("base64url");
  return `${header}.${payload}.${signature}`;
}

/** A running broker: its URLs, and stop / restart (same port, same data directory). */
export class Broker {
  /** @param {string[]} [extra] more broker flags (e.g. `--demo`) */
  static async start(extra = []) {
    const broker = new Broker(await freePort(), mkdtempSync(join(tmpdir(), "gavel-js-")), extra);
    await broker.run();
    return broker;
  }

  constructor(port, dataDir, extra = []) {
    this.extra = extra;
    this.port = port;
    this.dataDir = dataDir;
    this.wsUrl = `ws://127.0.0.1:${port}/ws`;
    this.httpUrl = `http://127.0.0.1:${port}`;
    this.child = null;
  }

  async run() {
    this.child = spawn(BINARY, [
      "--listen", `127.0.0.1:${this.port}`,
      "--data-dir", this.dataDir,
      "--jwt-secret", SECRET,
      "--api-key", API_KEY,
      "--presence-interval", "50ms",
      "--bid-rate", "200",
      "--bid-burst", "200",
      "--log", "warn",
      ...this.extra,
    ], { stdio: ["ignore", "ignore", "inherit"] });
    const exited = new Promise((_, reject) => this.child.once("exit", (code) => reject(
      new Error(`gavel-broker exited with ${code} (is ${BINARY} built? run cargo build -p gavel-broker)`),
    )));
    const deadline = Date.now() + 20_000;
    while (Date.now() < deadline) {
      try {
        const response = await Promise.race([fetch(`${this.httpUrl}/readyz`), exited]);
        if (response.ok) return;
      } catch (error) {
        if (String(error).includes("gavel-broker exited")) throw error;
      }
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    throw new Error("gavel-broker did not become ready in 20 s");
  }

  /** SIGTERM and wait for the exit. */
  async stop() {
    if (!this.child || this.child.exitCode !== null) return;
    const exited = new Promise((resolve) => this.child.once("exit", resolve));
    this.child.kill("SIGTERM");
    await exited;
  }

  async restart() {
    await this.stop();
    await this.run();
  }

  async close() {
    await this.stop();
    rmSync(this.dataDir, { recursive: true, force: true });
  }

  /** The auction's durable bid log (GET /api/auctions/{id}/bids). */
  async bids(id) {
    const response = await fetch(`${this.httpUrl}/api/auctions/${id}/bids?limit=1000`, {
      headers: { authorization: `Bearer ${API_KEY}` },
    });
    return (await response.json()).bids;
  }

  /** POST /api/auctions: an auction that is active now and ends in an hour. */
  async createAuction(id, extra = {}) {
    const now = Date.now();
    const response = await fetch(`${this.httpUrl}/api/auctions`, {
      method: "POST",
      headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
      body: JSON.stringify({
        id, title: `Lot ${id}`, currency: "EUR", starting_price: 100,
        increment: { fixed: 10 }, starts_at: now - 1000, ends_at: now + 3_600_000, ...extra,
      }),
    });
    if (response.status !== 201) throw new Error(`create auction: ${response.status} ${await response.text()}`);
    return response.json();
  }
}
