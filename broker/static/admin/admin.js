// The admin page: live stats, top rooms, and the auctions with their controls, through the
// broker's HTTP API (`/api/`, with the API key the operator types in; kept for this tab only).

const $ = (id) => document.getElementById(id);
let key = sessionStorage.getItem("gavel-admin-key") || "";
$("key").value = key;

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
    body: body ? JSON.stringify(body) : undefined,
  });
  const json = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(json.error ? `${json.error.code}: ${json.error.message}` : `HTTP ${response.status}`);
  return json;
}

function cells(tr, values) {
  for (const value of values) {
    const td = document.createElement("td");
    if (value instanceof Node) td.append(value); else td.textContent = value ?? "–";
    tr.append(td);
  }
  return tr;
}

function control(id, action) {
  const button = document.createElement("button");
  button.textContent = action;
  button.dataset.testid = `${action}-${id}`;
  button.onclick = async () => {
    try {
      await api("POST", `/api/auctions/${encodeURIComponent(id)}/${action}`);
      refresh();
    } catch (error) {
      $("error").textContent = error.message;
    }
  };
  return button;
}

async function refresh() {
  if (!key) return;
  try {
    const stats = await api("GET", "/api/stats");
    $("connections").textContent = stats.connections;
    $("users").textContent = stats.users_online;
    $("rooms").textContent = stats.rooms;
    $("top-rooms").replaceChildren(...stats.top_rooms.map((room) => cells(document.createElement("tr"), [
      room.channel, room.connections, room.users, room.seq,
    ])));
    const { auctions } = await api("GET", "/api/auctions");
    $("auctions").replaceChildren(...auctions.map((a) => {
      const actions = document.createElement("span");
      const live = a.status === "active" || a.status === "scheduled" || a.status === "paused";
      if (a.status === "active") actions.append(control(a.auction_id, "pause"));
      if (a.status === "paused") actions.append(control(a.auction_id, "resume"));
      if (live) actions.append(" ", control(a.auction_id, "end"));
      const tr = cells(document.createElement("tr"), [
        a.auction_id, a.title, a.status, a.price, a.leader, a.bid_count,
        new Date(a.ends_at).toLocaleTimeString(), actions,
      ]);
      tr.dataset.auction = a.auction_id;
      tr.dataset.status = a.status;
      return tr;
    }));
    $("error").textContent = "";
  } catch (error) {
    $("error").textContent = error.message;
  }
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  key = $("key").value.trim();
  sessionStorage.setItem("gavel-admin-key", key);
  refresh();
});

$("create").addEventListener("submit", async (event) => {
  event.preventDefault();
  const now = Date.now();
  try {
    await api("POST", "/api/auctions", {
      id: $("new-id").value, title: $("new-title").value, currency: "EUR",
      starting_price: Number($("new-price").value), increment: { fixed: 100 },
      starts_at: now, ends_at: now + Number($("new-minutes").value) * 60_000,
    });
    refresh();
  } catch (error) {
    $("error").textContent = error.message;
  }
});

setInterval(refresh, 2000);
refresh();
