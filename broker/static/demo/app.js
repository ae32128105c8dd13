// The live auction demo page. Everything it shows comes from the broker: the auction's state
// and events over the connection (WebSocket, or SSE when WebSockets are blocked), the bid
// history from the auction's durable bid log (GET /demo/api/auctions/{id}/bids) merged with
// live `bid_placed` events by bid_seq. ?user=NAME picks the bidder; ?transport=sse forces SSE.

import { GavelClient } from "/client/gavel-client.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const user = params.get("user") || sessionStorage.getItem("gavel-demo-user")
  || `guest${Math.floor(Math.random() * 10000)}`;
sessionStorage.setItem("gavel-demo-user", user);
$("me").textContent = user;

async function getToken() {
  const response = await fetch("/demo/api/token", { method: "POST", body: JSON.stringify({ user }) });
  if (!response.ok) throw new Error(`token: ${response.status}`);
  return (await response.json()).token;
}

const client = new GavelClient({
  url: `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`,
  token: getToken,
  format: "json",
  transport: params.get("transport") || "auto",
  backoff: { initial: 300, max: 5000 },
});

// For the browser console (and the browser tests): the page's client.
window.gavelClient = client;

function showConnection() {
  const el = $("connection");
  el.textContent = client.state === "open" ? `live (${client.transport})` : client.state;
  el.className = `pill ${client.state}`;
  el.dataset.state = client.state;
  el.dataset.transport = client.transport;
}
client.on("state", showConnection);
client.on("transport", (t) => toast(`WebSockets look blocked: using ${t.transport.toUpperCase()}`));

function toast(text) {
  const el = document.createElement("div");
  el.className = "toast";
  el.textContent = text;
  $("toasts").append(el);
  setTimeout(() => el.remove(), 6000);
}

const money = (amount, currency) => amount == null ? "–"
  : `${(amount / 100).toLocaleString(undefined, { minimumFractionDigits: 2 })} ${currency || ""}`;

/** The auction on screen. */
let lot = null;

async function loadList() {
  const response = await fetch("/demo/api/auctions");
  const { auctions } = await response.json();
  const list = $("auctions");
  list.replaceChildren(...auctions.map((a) => {
    const li = document.createElement("li");
    const link = document.createElement("a");
    link.href = `#${a.auction_id}`;
    link.textContent = `${a.title} · ${a.status}`;
    link.dataset.auction = a.auction_id;
    if (lot && lot.id === a.auction_id) link.className = "current";
    li.append(link);
    return li;
  }));
  return auctions;
}

/** The bid log from the broker's durable store (every page of it). */
async function loadHistory(id) {
  const bids = new Map();
  let after = 0;
  for (;;) {
    const response = await fetch(`/demo/api/auctions/${encodeURIComponent(id)}/bids?after=${after}&limit=1000`);
    const page = await response.json();
    for (const bid of page.bids || []) bids.set(bid.seq, { seq: bid.seq, amount: bid.amount, bidder: bid.user, ts: bid.ts });
    if (page.next_after == null) return bids;
    after = page.next_after;
  }
}

async function open(id) {
  if (lot) await client.unsubscribe(`auction:${lot.id}`).catch(() => {});
  // This auction's view; handlers that fire after the user moved on find it is not `lot`.
  const mine = { id, state: null, bids: new Map(), winner: null, recovered: null };
  lot = mine;
  delete $("lot").dataset.recovered;
  $("lot").hidden = false;
  $("winner").hidden = true;
  loadList();
  /** The bid log, merged by bid_seq with what live events already brought. */
  const mergeHistory = async () => {
    const logged = await loadHistory(id);
    for (const [seq, bid] of logged) mine.bids.set(seq, bid);
    if (lot === mine) render();
  };
  const subscription = await client.subscribe(`auction:${id}`, {
    onSubscribed(result) {
      if (result.state) mine.state = { ...result.state };
      if (lot === mine) render();
    },
    onEvent(event) {
      apply(mine, event);
      if (lot === mine) render();
    },
    onViewers(viewers) {
      if (lot === mine) $("viewers").textContent = viewers.users;
    },
    async onRecovered(recovery) {
      mine.recovered = recovery.recovered;
      if (lot === mine) $("lot").dataset.recovered = String(recovery.recovered);
      if (!recovery.recovered) {
        // Not everything missed could be replayed: take the state, and the log's bids.
        mine.state = { ...recovery.state };
        await mergeHistory();
      }
      if (lot === mine) render();
    },
  });
  await mergeHistory();
  if (lot === mine && subscription.viewers) $("viewers").textContent = subscription.viewers.users;
}

/** One room event into a view of its auction. */
function apply(view, event) {
  const data = event.data || {};
  const state = view.state || (view.state = {});
  switch (event.event) {
    case "bid_placed":
      view.bids.set(data.bid_seq, { seq: data.bid_seq, amount: data.amount, bidder: data.bidder, ts: data.server_ts });
      Object.assign(state, {
        price: data.amount, leader: data.bidder, bid_count: data.bid_count,
        next_min_bid: data.next_min_bid, ends_at: data.ends_at, last_bid_seq: data.bid_seq,
      });
      // Buy-now lapses once the bidding passes it (the state says so; events carry no field).
      if (state.buy_now != null && data.next_min_bid > state.buy_now) delete state.buy_now;
      break;
    case "extended":
      state.ends_at = data.ends_at;
      toast("Soft close: the auction was extended");
      break;
    case "status_changed":
      state.status = data.status;
      if (data.ends_at) state.ends_at = data.ends_at;
      break;
    case "updated":
      Object.assign(state, { starts_at: data.starts_at, ends_at: data.ends_at });
      break;
    case "ended":
      state.status = "ended";
      delete state.buy_now;
      view.winner = data;
      break;
    default:
      break;
  }
}

function render() {
  if (!lot || !lot.state) return;
  const s = lot.state;
  $("title").textContent = s.title || lot.id;
  $("status").textContent = s.status;
  $("status").className = `pill ${s.status}`;
  $("price").textContent = money(s.price, s.currency);
  $("price").dataset.amount = s.price ?? "";
  $("leader").textContent = s.leader || "–";
  $("bid-count").textContent = s.bid_count ?? 0;
  const ended = s.status === "ended" || s.status === "cancelled";
  if (lot.winner || ended) {
    const w = lot.winner;
    $("winner").hidden = false;
    $("winner").textContent = s.status === "cancelled" ? "Cancelled"
      : w && w.winner ? `Won by ${w.winner} for ${money(w.final_price, s.currency)}`
        : s.leader ? `Won by ${s.leader} for ${money(s.price, s.currency)}` : "Ended without a winner";
    $("winner").dataset.winner = (w && w.winner) || s.leader || "";
  }
  // Quick bids: the least accepted amount, and two more increments above it.
  const step = s.price != null ? Math.max(1, s.next_min_bid - s.price) : Math.max(1, Math.round(s.next_min_bid / 10));
  const amounts = [s.next_min_bid, s.next_min_bid + step, s.next_min_bid + 5 * step];
  const buttons = amounts.map((amount, i) => {
    const button = document.createElement("button");
    button.textContent = `Bid ${money(amount, s.currency)}`;
    button.dataset.testid = `quick-bid-${i}`;
    button.dataset.amount = amount;
    button.disabled = s.status !== "active";
    button.onclick = () => bid(amount);
    return button;
  });
  if (s.buy_now != null) {
    // The broker shows buy_now only while it applies: a bid of that much ends the auction.
    const button = document.createElement("button");
    button.textContent = `Buy now ${money(s.buy_now, s.currency)}`;
    button.dataset.testid = "buy-now";
    button.disabled = s.status !== "active";
    button.onclick = () => bid(s.buy_now);
    buttons.push(button);
  }
  $("quick").replaceChildren(...buttons);
  $("who-may-bid").textContent = s.required_role ? `Bidding needs the role “${s.required_role}”.` : "";
  const rows = [...lot.bids.values()].sort((a, b) => b.seq - a.seq).map((b) => {
    const tr = document.createElement("tr");
    tr.dataset.seq = b.seq;
    tr.dataset.amount = b.amount;
    for (const text of [b.seq, money(b.amount, s.currency), b.bidder, new Date(b.ts).toLocaleTimeString()]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    return tr;
  });
  $("history").replaceChildren(...rows);
  tick();
}

/** The countdown, on the broker's clock (it follows `extended`). */
function tick() {
  if (!lot || !lot.state) return;
  const s = lot.state;
  const el = $("countdown");
  el.dataset.endsAt = s.ends_at;
  if (s.status === "scheduled") {
    el.textContent = `starts in ${format(s.starts_at - client.serverNow())}`;
  } else if (s.status === "active") {
    el.textContent = `ends in ${format(s.ends_at - client.serverNow())}`;
  } else {
    el.textContent = "";
  }
}
setInterval(tick, 250);

function format(ms) {
  const total = Math.max(0, Math.floor(ms / 1000));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const sec = total % 60;
  return h ? `${h}h ${m}m` : `${m}:${String(sec).padStart(2, "0")}`;
}

async function bid(amount) {
  $("answer").textContent = "…";
  try {
    const answer = await client.placeBid(lot.id, amount);
    $("answer").textContent = answer.kind === "bid_accepted"
      ? `Accepted: bid #${answer.bid_seq}` : `Refused: ${answer.message}`;
    $("answer").dataset.kind = answer.kind;
  } catch (error) {
    $("answer").textContent = `Not sent: ${error.message}`;
  }
}

$("custom").addEventListener("submit", (event) => {
  event.preventDefault();
  const amount = Number($("amount").value);
  if (Number.isInteger(amount) && amount > 0) bid(amount);
});

// Outbid notices on the user's own channel.
async function start() {
  showConnection();
  await client.connect();
  await client.subscribe(`user:${user}`, {
    onEvent(event) {
      // The broker's outbid notice, on the user's own channel.
      if (event.event === "outbid") {
        const currency = lot && lot.id === event.data.auction_id ? lot.state?.currency : "";
        toast(`You were outbid on ${event.data.auction_id}: now ${money(event.data.amount, currency)}`);
      }
    },
  });
  const auctions = await loadList();
  const wanted = location.hash.slice(1) || auctions[0]?.auction_id;
  if (wanted) await open(wanted);
  document.body.dataset.ready = "true";
}
window.addEventListener("hashchange", () => open(location.hash.slice(1)));
start().catch((error) => toast(`Cannot start: ${error.message}`));
