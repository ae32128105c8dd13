//! The Lua scripts that make Redis the cluster's single sequencer. Each runs atomically in
//! Redis, so a room's seq, its history and the PUBLISH that carries an event to every node
//! happen as one step, and an auction's bids are checked and appended as one step.
//!
//! Keys (prefix `P`, room channel `C`, auction `A`, node `N`):
//! - `P:room:C:seq` / `:epoch` / `:h` (history list) / `:s` (state): a room's sequence.
//! - `P:pres:C:conns` (hash node → connections), `:u:N` (set of viewer keys of node N),
//!   `:nodes` (nodes counted), `:peak` (hash c/u), `:last` (the totals last published, as
//!   their `V` message): presence.
//! - `P:nodes` (sorted set node → last heartbeat ms), `P:node:N:rooms`: liveness.
//! - `P:auction:A:r` (record), `:v` (version), `:bids` (list, index = seq - 1), `:req` (hash
//!   `user\0request id` → seq, the idempotency index), `:lock`; `P:auctions` (set of live
//!   ids), `P:archived` (set of archived ids).
//! - `P:webhooks` (hash webhook id → entry: the outbox), `P:webhook-lease:ID` (the node
//!   attempting a webhook now).
//!
//! Pub/sub channels: `P:ch:C` per room, `P:control` for auction notices.
//! Messages: `E<seq> <epoch> <json>` (an event), `S<json>` (a signal),
//! `V<conns> <users> <peak conns> <peak users> <at>` (cluster viewer counts, computed at `at`,
//! Redis's clock in µs: the later of two wins), and on the control
//! channel `A<id>` (created) and `C<id> <version>` (changed).

/// Shared Lua: publish one sequenced event in a room. Room keys live for `room_ttl_ms` after
/// the room's last event or sync (state keys do not expire: an auction's state outlives its
/// room's quiet days).
const ROOM_PUBLISH: &str = r#"
local function room_publish(P, ch, body, state, epoch_new, ttl, hist, known_epoch, known_seq)
  local base = P .. ':room:' .. ch
  -- The epoch names one run of seqs: without it (new room, or its keys expired or were
  -- evicted) a new run starts at 1. With it, seqs continue. A publisher that follows the room
  -- says which seq it has seen: a Redis that is behind it (a failover to a lagging replica)
  -- must not hand out those seqs again, so the run starts over in a new epoch.
  local epoch = redis.call('GET', base .. ':epoch')
  if epoch and epoch == known_epoch and tonumber(redis.call('GET', base .. ':seq') or '0') < tonumber(known_seq) then
    epoch = nil
  end
  if not epoch then
    epoch = epoch_new
    redis.call('SET', base .. ':epoch', epoch)
    redis.call('DEL', base .. ':seq', base .. ':h')
  end
  local seq = redis.call('INCR', base .. ':seq')
  local msg = 'E' .. seq .. ' ' .. epoch .. ' ' .. body
  redis.call('RPUSH', base .. ':h', msg)
  redis.call('LTRIM', base .. ':h', -hist, -1)
  if state ~= '' then redis.call('SET', base .. ':s', state) end
  redis.call('PEXPIRE', base .. ':seq', ttl)
  redis.call('PEXPIRE', base .. ':epoch', ttl)
  redis.call('PEXPIRE', base .. ':h', ttl)
  local nodes = redis.call('PUBLISH', P .. ':ch:' .. ch, msg)
  return {seq, nodes}
end
"#;

/// Shared Lua: recompute a room's cluster viewer counts and publish them to every node.
const PRESENCE_TOTALS: &str = r#"
local function presence_totals(P, ch)
  local base = P .. ':pres:' .. ch
  local nodes = redis.call('SMEMBERS', base .. ':nodes')
  local conns = 0
  local keys = {}
  for _, n in ipairs(nodes) do
    conns = conns + tonumber(redis.call('HGET', base .. ':conns', n) or '0')
    keys[#keys + 1] = base .. ':u:' .. n
  end
  local users = 0
  if #keys > 0 then
    users = redis.call('SUNIONSTORE', base .. ':tmp', unpack(keys))
    redis.call('DEL', base .. ':tmp')
  end
  local pc = math.max(tonumber(redis.call('HGET', base .. ':peak', 'c') or '0'), conns)
  local pu = math.max(tonumber(redis.call('HGET', base .. ':peak', 'u') or '0'), users)
  -- When, on Redis's clock in µs (as a string: a Lua number would print as 1.8e+15).
  local t = redis.call('TIME')
  local at = t[1] .. string.format('%06d', tonumber(t[2]))
  local totals = 'V' .. conns .. ' ' .. users .. ' ' .. pc .. ' ' .. pu .. ' ' .. at
  if conns == 0 then
    redis.call('DEL', base .. ':peak', base .. ':last')
  else
    redis.call('HSET', base .. ':peak', 'c', pc, 'u', pu)
    redis.call('SET', base .. ':last', totals)
  end
  redis.call('PUBLISH', P .. ':ch:' .. ch, totals)
  return {conns, users}
end
"#;

/// ARGV: prefix, channel, body json, state json or '', new epoch, room ttl ms, history size,
/// the publisher's known epoch and seq of the room ('0' '0' when it does not follow it).
/// Returns {seq, nodes that received it}.
pub const PUBLISH: &str = r#"
return room_publish(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8], ARGV[9])
"#;

/// ARGV: prefix, channel, new epoch, room ttl ms, the caller's known epoch and seq of the room.
/// Returns {seq, epoch, state or '', the viewer totals last published (their `V` message) or '',
/// history entries...}. A room without an epoch is not created (a subscriber alone never makes
/// keys): it reads as seq 0 of epoch 0, and its first event starts epoch and seqs (that event,
/// seq 1, carries its epoch to the subscribers). A room whose seq is behind what the caller saw
/// in the same epoch (a failover to a lagging replica) starts over in a new epoch rather than
/// reuse seqs.
pub const SYNC_ROOM: &str = r#"
local base = ARGV[1] .. ':room:' .. ARGV[2]
local ttl = tonumber(ARGV[4])
local state = redis.call('GET', base .. ':s') or ''
local totals = redis.call('GET', ARGV[1] .. ':pres:' .. ARGV[2] .. ':last') or ''
local epoch = redis.call('GET', base .. ':epoch')
if not epoch then return {'0', '0', state, totals} end
local seq = redis.call('GET', base .. ':seq') or '0'
if epoch == ARGV[5] and tonumber(seq) < tonumber(ARGV[6]) then
  epoch = ARGV[3]
  seq = '0'
  redis.call('SET', base .. ':epoch', epoch)
  redis.call('DEL', base .. ':seq', base .. ':h')
end
redis.call('PEXPIRE', base .. ':epoch', ttl)
redis.call('PEXPIRE', base .. ':seq', ttl)
redis.call('PEXPIRE', base .. ':h', ttl)
local out = {seq, epoch, state, totals}
for _, e in ipairs(redis.call('LRANGE', base .. ':h', 0, -1)) do out[#out + 1] = e end
return out
"#;

/// ARGV: prefix, channel, node, connections, viewer keys... Replaces this node's share of a
/// room's presence and publishes the new cluster totals. Returns {connections, users}.
pub const PRESENCE: &str = r#"
local P, ch, node, conns = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local base = P .. ':pres:' .. ch
local ukey = base .. ':u:' .. node
redis.call('DEL', ukey)
if conns == 0 then
  redis.call('HDEL', base .. ':conns', node)
  redis.call('SREM', base .. ':nodes', node)
  redis.call('SREM', P .. ':node:' .. node .. ':rooms', ch)
else
  redis.call('HSET', base .. ':conns', node, conns)
  redis.call('SADD', base .. ':nodes', node)
  redis.call('SADD', P .. ':node:' .. node .. ':rooms', ch)
  local i = 5
  while i <= #ARGV do
    local last = math.min(i + 4999, #ARGV)
    redis.call('SADD', ukey, unpack(ARGV, i, last))
    i = last + 1
  end
end
return presence_totals(P, ch)
"#;

/// Shared Lua: Redis's own clock in ms, so nodes' clocks need not agree for heartbeats.
const REDIS_NOW: &str = r#"
local function redis_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"#;

/// Shared Lua: removes node `d` from the cluster with its presence in every room, and
/// publishes those rooms' corrected counts.
const FORGET_NODE: &str = r#"
local function forget_node(P, d)
  redis.call('ZREM', P .. ':nodes', d)
  local rooms = redis.call('SMEMBERS', P .. ':node:' .. d .. ':rooms')
  for _, ch in ipairs(rooms) do
    local base = P .. ':pres:' .. ch
    redis.call('HDEL', base .. ':conns', d)
    redis.call('DEL', base .. ':u:' .. d)
    redis.call('SREM', base .. ':nodes', d)
    presence_totals(P, ch)
  end
  redis.call('DEL', P .. ':node:' .. d .. ':rooms')
end
"#;

/// ARGV: prefix, node, '1' for a process's first heartbeat. Records a heartbeat at Redis's
/// time. Returns 1 if the node was not listed (new, or reaped as dead, or Redis lost its data):
/// it must report its presence again. A first heartbeat forgets what an earlier process with the
/// same node id left (one killed and restarted before it was reaped): its viewers are gone.
pub const HEARTBEAT: &str = r#"
if ARGV[3] == '1' then forget_node(ARGV[1], ARGV[2]) end
return redis.call('ZADD', ARGV[1] .. ':nodes', redis_now_ms(), ARGV[2])
"#;

/// ARGV: prefix, ttl ms. Removes nodes whose last heartbeat (Redis time) is older than the
/// ttl, with their presence, and publishes the corrected counts. Returns the nodes removed.
pub const REAP: &str = r#"
local P = ARGV[1]
local dead = redis.call('ZRANGEBYSCORE', P .. ':nodes', '-inf', redis_now_ms() - tonumber(ARGV[2]))
for _, d in ipairs(dead) do forget_node(P, d) end
return dead
"#;

/// ARGV: prefix, auction, node token, lock ttl ms. Takes (or extends) the auction's lock.
/// Returns {1, version, now ms} when this node holds it, {0, version, now ms} when another node
/// does. The time is Redis's: every node judges an auction's deadlines on this one clock.
pub const LOCK: &str = r#"
local base = ARGV[1] .. ':auction:' .. ARGV[2]
local holder = redis.call('GET', base .. ':lock')
local version = tonumber(redis.call('GET', base .. ':v') or '0')
if holder and holder ~= ARGV[3] then return {0, version, redis_now_ms()} end
redis.call('SET', base .. ':lock', ARGV[3], 'PX', tonumber(ARGV[4]))
return {1, version, redis_now_ms()}
"#;

/// ARGV: prefix, auction, node token. Releases the lock if this node holds it.
pub const UNLOCK: &str = r#"
local key = ARGV[1] .. ':auction:' .. ARGV[2] .. ':lock'
if redis.call('GET', key) == ARGV[3] then redis.call('DEL', key) end
return 1
"#;

/// ARGV: prefix, auction, after seq. Returns {version, record or '', bids after `after`...}.
pub const READ_AUCTION: &str = r#"
local base = ARGV[1] .. ':auction:' .. ARGV[2]
local out = {tonumber(redis.call('GET', base .. ':v') or '0'), redis.call('GET', base .. ':r') or ''}
for _, b in ipairs(redis.call('LRANGE', base .. ':bids', tonumber(ARGV[3]), -1)) do out[#out + 1] = b end
return out
"#;

/// ARGV: prefix, auction, node token, expected version, record, new epoch, room ttl ms,
/// history size, bid count n, n × (bid, idempotency key or "" for an automatic bid), webhook
/// count w, w × (id, entry), event count m, m × (channel, body, state, known epoch, known seq).
/// The webhooks go to the outbox `P:webhooks` with the bids, in the same step.
/// The compare-and-set at the heart of cluster bidding: only the lock holder whose view is
/// the current version may append. Bids, record, version and the room events are one atomic
/// step; then the lock is released and the other nodes are told. Returns {new version}, or
/// {-1} (lock lost) or {-2} (version moved).
pub const COMMIT: &str = r#"
local P, A, token = ARGV[1], ARGV[2], ARGV[3]
local base = P .. ':auction:' .. A
if redis.call('GET', base .. ':lock') ~= token then return {-1} end
if tonumber(redis.call('GET', base .. ':v') or '0') ~= tonumber(ARGV[4]) then return {-2} end
local epoch_new, ttl, hist = ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
local n = tonumber(ARGV[9])
local i = 10
for _ = 1, n do
  local seq = redis.call('RPUSH', base .. ':bids', ARGV[i])
  if ARGV[i + 1] ~= '' then redis.call('HSET', base .. ':req', ARGV[i + 1], seq) end
  i = i + 2
end
local w = tonumber(ARGV[i])
i = i + 1
for _ = 1, w do
  redis.call('HSET', P .. ':webhooks', ARGV[i], ARGV[i + 1])
  i = i + 2
end
redis.call('SET', base .. ':r', ARGV[5])
local version = redis.call('INCR', base .. ':v')
local m = tonumber(ARGV[i])
i = i + 1
for _ = 1, m do
  room_publish(P, ARGV[i], ARGV[i + 1], ARGV[i + 2], epoch_new, ttl, hist, ARGV[i + 3], ARGV[i + 4])
  i = i + 5
end
redis.call('DEL', base .. ':lock')
redis.call('PUBLISH', P .. ':control', 'C' .. A .. ' ' .. version)
return {version}
"#;

/// ARGV: prefix, auction, record, room state json. Creates an auction unless it exists.
/// Returns 1 if created, 0 if the id is taken.
pub const CREATE_AUCTION: &str = r#"
local P, A = ARGV[1], ARGV[2]
local base = P .. ':auction:' .. A
if redis.call('EXISTS', base .. ':r') == 1 then return 0 end
redis.call('SET', base .. ':r', ARGV[3])
redis.call('SET', base .. ':v', 1)
redis.call('SADD', P .. ':auctions', A)
redis.call('SET', P .. ':room:auction:' .. A .. ':s', ARGV[4])
redis.call('PUBLISH', P .. ':control', 'A' .. A)
return 1
"#;

/// ARGV: prefix, auction, idempotency keys... Returns, per key, the bid placed under it or ''.
pub const FIND_BIDS: &str = r#"
local base = ARGV[1] .. ':auction:' .. ARGV[2]
local out = {}
for i = 3, #ARGV do
  local seq = redis.call('HGET', base .. ':req', ARGV[i])
  if seq then
    out[#out + 1] = redis.call('LINDEX', base .. ':bids', tonumber(seq) - 1) or ''
  else
    out[#out + 1] = ''
  end
end
return out
"#;

/// The full source of a script that uses the shared functions.
pub fn with_helpers(body: &str) -> String {
    format!("{ROOM_PUBLISH}\n{PRESENCE_TOTALS}\n{FORGET_NODE}\n{REDIS_NOW}\n{body}")
}

/// KEYS: the outbox hash. ARGV: webhook id, entry. Records a failed attempt, unless the webhook
/// was delivered (removed) meanwhile by another node: it must not come back.
pub const UPDATE_WEBHOOK: &str = r#"
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
return 1
"#;
