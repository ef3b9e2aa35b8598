"""The Lua scripts of the cluster store (cluster_store.py): each is one atomic step in Redis, so
two nodes racing for one ID or one client's pending cap cannot both win, and each is one round
trip where a set-up waits for it."""

# Claim an ID for this node unless another node holds it, or it is reserved for another
# credential (atomic: two nodes racing for one ID cannot both win). ARGV: record, node, TTL in ms,
# credential ('' for none), takeover ('1'/'0'), channel prefix, the message that tells the holder
# to drop it, the ID; KEYS[2]: this credential's reservations (see RELEASE). Returns nil when granted;
# else {why, the holder's record}: 'taken' (online with another credential), 'reserved' (offline,
# reserved for another credential), 'in_use' (online with the same credential, no takeover) or
# 'took' (same credential, takeover: granted, and the holder was told on its channel).
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
      redis.call('PUBLISH', ARGV[6] .. held['node'], ARGV[7])
      return {'took', cur}
    end
    redis.call('ZREM', KEYS[2], ARGV[8])
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return false
"""
# An ID's record when its client goes offline, if this node (ARGV[1]) still holds it: deleted,
# or, with a reservation time (ARGV[3] ms > 0) and a credential, replaced by a reservation
# (ARGV[2]: {node: null, credential, offlineSince}) for that long, so another token cannot take
# the ID on any node meanwhile (as registry.py does on one relay). KEYS[2] indexes the
# credential's reservations (zset id -> offline since, ms = ARGV[4]); beyond ARGV[5] of them the
# oldest go. Returns the IDs whose reservation was dropped for the cap (the caller forgets them).
RELEASE = """
local cur = redis.call('GET', KEYS[1])
if not cur then return {} end
local ok, held = pcall(cjson.decode, cur)
if not ok or type(held) ~= 'table' or held['node'] ~= ARGV[1] then return {} end
if tonumber(ARGV[3]) <= 0 or type(held['credential']) ~= 'string' then
  redis.call('DEL', KEYS[1])
  return {}
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', tonumber(ARGV[4]) - tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[2], ARGV[3])
local dropped = {}
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[5])
if over > 0 then
  for i, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, over - 1)) do dropped[i] = member end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1)
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


# Find the node holding B's ID and publish ``connect`` to it, in one round trip (the set-up of a
# cross-node session waits for it), unless A already has too many sessions pending in the
# cluster: those in A's pending index (KEYS[2], zset member -> deadline in ms) plus ARGV[5], A's
# pending ones on this node that the index does not hold. A granted request holds a place in the
# index (ARGV[7], until ARGV[8]) until the data node puts the session itself there.
# Returns {holder node or '', subscribers that got it, A's pending sessions in the index, 1: over the cap}.
SEND_TO_HOLDER = """
local cur = redis.call('GET', KEYS[1])
if not cur then return {'', 0, 0, 0} end
local ok, held = pcall(cjson.decode, cur)
if not ok or type(held) ~= 'table' or type(held['node']) ~= 'string' or held['node'] == ARGV[1] then
  return {'', 0, 0, 0}
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[6])
local pending = redis.call('ZCARD', KEYS[2])
if pending + tonumber(ARGV[5]) >= tonumber(ARGV[4]) then return {held['node'], 0, pending, 1} end
redis.call('ZADD', KEYS[2], ARGV[8], ARGV[7])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[9]) then redis.call('PEXPIRE', KEYS[2], ARGV[9]) end
return {held['node'], redis.call('PUBLISH', ARGV[2] .. held['node'], ARGV[3]), pending + 1, 0}
"""
# The data node's first message about a new cross-node session, with the session's pending key
# (KEYS[1]) written and A's index (KEYS[2]) moved from the request's place to the session, in
# the same round trip. Returns the subscribers that got the message.
PUBLISH_PENDING = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
return redis.call('PUBLISH', ARGV[6], ARGV[7])
"""
