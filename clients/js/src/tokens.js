// Token refresh: a fresh token from the client's `token` function before the current one
// expires (protocol §4.11), retried while it lasts, at once on the broker's `token_expired`.

import { GavelError } from "./codes.js";

/** The longest delay setTimeout honours (a longer one fires at once). */
const MAX_TIMER_MS = 2_147_483_647;

/** Schedules the refresh of a token that expires at `expiresAt` (broker time, ms).
 * @param {import("./index.js").GavelClient} client */
export function scheduleRefresh(client, expiresAt) {
  clearTimeout(client._refreshTimer);
  if (!expiresAt) return;
  // A minute before expiry, or at 80 % of what is left when that is under five minutes.
  const left = expiresAt - client.serverNow();
  const wait = Math.max(1_000, left > 300_000 ? left - 60_000 : left * 0.8);
  // A token good for weeks: wait in steps (a longer timer would fire at once).
  client._refreshTimer = wait > MAX_TIMER_MS
    ? setTimeout(() => scheduleRefresh(client, expiresAt), MAX_TIMER_MS)
    : setTimeout(() => refresh(client, expiresAt), wait);
}

/** Sends a fresh token; `expiresAt`: the expiry of the one it replaces, if known. */
export async function refresh(client, expiresAt) {
  if (client.state !== "open" || !client.getToken) return;
  try {
    const token = await client.getToken();
    const result = await client._request({ type: "auth", token });
    client._emit("authenticated", result);
    // Conversations the new token no longer lists: the broker left them.
    for (const channel of result.unsubscribed || []) {
      const subscription = client._subscriptions.get(channel);
      if (!subscription) continue;
      client._subscriptions.delete(channel);
      clearTimeout(subscription.retry);
      subscription.active = false;
      const error = new GavelError("forbidden", `the new token does not list ${channel}: unsubscribed`);
      error.channel = channel;
      subscription.handlers.onError?.(error, subscription);
    }
    // The same token again: no refresh before expiry (the broker's `token_expired` asks).
    if (!expiresAt || result.expires_at > expiresAt) scheduleRefresh(client, result.expires_at);
  } catch (error) {
    client._emit("error", error);
    // Again soon, while the token (then the broker's grace after `token_expired`) lasts.
    const left = expiresAt ? expiresAt - client.serverNow() : 0;
    clearTimeout(client._refreshTimer);
    if (client.state === "open") {
      client._refreshTimer = left > 0
        ? setTimeout(() => refresh(client, expiresAt), Math.max(1_000, Math.min(30_000, left / 4)))
        : setTimeout(() => refresh(client), 3_000);
    }
  }
}
