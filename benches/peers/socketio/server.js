// A Socket.IO 4 auction server in the shape most tutorials and production apps use: auction
// state in process memory, rooms per auction, `join-auction`, `place-bid` with an ack,
// `bid-placed` broadcast to the room, `viewerCountUpdate` on joins and leaves.
// Usage: PORT=7800 node server.js   (binds 127.0.0.1 only)
const http = require("http");
const { Server } = require("socket.io");

const port = Number(process.env.PORT || 7800);
const server = http.createServer();
const io = new Server(server, { transports: ["websocket"], serveClient: false });
const auctions = new Map(); // auctionId -> { price, leader, bids }

function auction(id) {
  if (!auctions.has(id)) auctions.set(id, { price: 0, leader: null, bids: 0 });
  return auctions.get(id);
}

function viewerCount(room) {
  const members = io.sockets.adapter.rooms.get(room);
  io.to(room).emit("viewerCountUpdate", { room, count: members ? members.size : 0 });
}

io.on("connection", (socket) => {
  const user = socket.handshake.query.user || socket.id;
  socket.on("join-auction", ({ auctionId }, ack) => {
    const room = `auction:${auctionId}`;
    socket.join(room);
    const a = auction(auctionId);
    if (typeof ack === "function") ack({ ok: true, price: a.price, bids: a.bids });
    viewerCount(room);
  });
  socket.on("place-bid", ({ auctionId, amount }, ack) => {
    const a = auction(auctionId);
    if (!(amount > a.price)) {
      if (typeof ack === "function") ack({ ok: false, reason: "too_low", price: a.price });
      return;
    }
    a.price = amount;
    a.leader = user;
    a.bids += 1;
    io.to(`auction:${auctionId}`).emit("bid-placed", { auctionId, amount, bidder: user, bids: a.bids, ts: Date.now() });
    if (typeof ack === "function") ack({ ok: true, amount, bids: a.bids });
  });
  socket.on("disconnecting", () => {
    for (const room of socket.rooms) if (room.startsWith("auction:")) setImmediate(() => viewerCount(room));
  });
});

server.listen(port, "127.0.0.1", () => console.log(`socket.io auction peer on 127.0.0.1:${port}`));
