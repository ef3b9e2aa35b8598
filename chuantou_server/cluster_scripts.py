"""The Lua scripts of the cluster store (cluster_store.py): each is one atomic step in Redis, so
two nodes racing for one ID or one client's pending cap cannot both win, and each is one round
trip where a set-up waits for it.

Each script names every key it touches in KEYS, and those keys share one hash slot
(cluster_keys.py), as a Redis Cluster requires. A script publishes its message itself on one
Redis (one round trip); on a Redis Cluster it is given '' for the channel (ARGV) and publishes
nothing: the store publishes right after it, through the master of the channel's slot, where
the node's subscription is, since a Cluster's PUBLISH counts only the subscribers on the master
it ran on (and the caller needs that count: 0 means that node does not listen)."""

# Claim an ID (KEYS[1]: its record) for this node unless another node holds it, or it is reserved
# for another credential (atomic: two nodes racing for one ID cannot both win). ARGV: record, node,
# TTL in ms, credential ('' for none), takeover ('1'/'0'), channel prefix ('' on a Cluster), the
# message that tells the holder to drop it. Returns nil when granted; else {why, the holder's record}: 'taken' (online
# with another credential), 'reserved' (offline, reserved for another credential), 'in_use' (online
# with the same credential, no takeover) or 'took' (same credential, takeover: granted, and the
# holder was told on its channel). The credential's reservations are another slot: the caller
# takes the ID out of them beside this script (ClusterStore.claim).
CLAIM = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, held = pcall(cjson.decode, cur)
  if ok and type(held) == 'table' and held['node'] ~= ARGV[2] then
    local cred = held['credential']
    if type(cred) ~= 'string' then cred = '' end
    local online = type(held['node']) == 'string'
    if cred ~= ARGV[4] then
      if online then return {'taken', cur} end
      return {'reserved', cur}
    end
    if online then
      if ARGV[5] ~= '1' then return {'in_use', cur} end
      redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
      if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[6] .. held['node'], ARGV[7]) end
      return {'took', cur}
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return false
"""
# An ID's record (KEYS[1]) when its client goes offline, if this node (ARGV[1]) still holds it:
# deleted, or, with a reservation time (ARGV[3] ms > 0) and a credential, replaced by a
# reservation (ARGV[2]: {node: null, credential, offlineSince}) for that long, so another token
# cannot take the ID on any node meanwhile (as registry.py does on one relay). Returns 1 when it
# reserved the ID (the caller then indexes it, RESERVE), else 0.
RELEASE = """
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local ok, held = pcall(cjson.decode, cur)
if not ok or type(held) ~= 'table' or held['node'] ~= ARGV[1] then return 0 end
if tonumber(ARGV[3]) <= 0 or type(held['credential']) ~= 'string' then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""
# Index an ID just reserved (ARGV[4]) in its credential's reservations (KEYS[1], zset id -> offline
# since, ms = ARGV[1]) kept ARGV[2] ms; beyond ARGV[3] of them the oldest go. Returns the IDs
# whose reservation was dropped for the cap (the caller forgets them, FORGET_RESERVATION).
RESERVE = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local dropped = {}
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3])
if over > 0 then
  for i, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, over - 1)) do dropped[i] = member end
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, over - 1)
end
return dropped
"""
# Forget an ID's reservation dropped for its credential's cap, if it is still that reservation
# (ARGV[1]: the credential) and not online again.
FORGET_RESERVATION = """
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local ok, held = pcall(cjson.decode, cur)
if ok and type(held) == 'table' and type(held['node']) ~= 'string' and held['credential'] == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


# Find the node holding B's ID and publish ``connect`` to it unless A already has too many
# sessions pending in the cluster: those in A's pending index (KEYS[#KEYS], zset member -> deadline
# in ms) plus ARGV[5], A's pending ones on this node that the index does not hold. On one Redis
# KEYS[1] is B's record, read here (one round trip: the set-up of a cross-node session waits for
# it); on a Redis Cluster B's record is another slot, read just before and passed as ARGV[10]
# with KEYS = {A's index} alone. A granted request holds a place in the index (ARGV[7], until
# ARGV[8]) until the data node puts the session itself there.
# Returns {holder node or '', subscribers that got it, A's pending sessions in the index, 1: over the cap}.
SEND_TO_HOLDER = """
local cur = ARGV[10]
if #KEYS == 2 then cur = redis.call('GET', KEYS[1]) end
local index = KEYS[#KEYS]
if not cur or cur == '' then return {'', 0, 0, 0} end
local ok, held = pcall(cjson.decode, cur)
if not ok or type(held) ~= 'table' or type(held['node']) ~= 'string' or held['node'] == ARGV[1] then
  return {'', 0, 0, 0}
end
redis.call('ZREMRANGEBYSCORE', index, '-inf', ARGV[6])
local pending = redis.call('ZCARD', index)
if pending + tonumber(ARGV[5]) >= tonumber(ARGV[4]) then return {held['node'], 0, pending, 1} end
redis.call('ZADD', index, ARGV[8], ARGV[7])
if redis.call('PTTL', index) < tonumber(ARGV[9]) then redis.call('PEXPIRE', index, ARGV[9]) end
if ARGV[2] == '' then return {held['node'], 0, pending + 1, 0} end
return {held['node'], redis.call('PUBLISH', ARGV[2] .. held['node'], ARGV[3]), pending + 1, 0}
"""
# The data node's first message about a new cross-node session, with the session's pending key
# (KEYS[1], in A's slot) written and A's index (KEYS[2]) moved from the request's place to the session, in
# the same round trip. Returns the subscribers that got the message.
PUBLISH_PENDING = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
if ARGV[6] == '' then return 0 end
return redis.call('PUBLISH', ARGV[6], ARGV[7])
"""
