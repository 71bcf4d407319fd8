-- session_create: start an empty session under a new id, unless the id is taken.
-- KEYS: [1] index, [2] seq, [3] meta, [4] messages, [5] idem (see session_lib.lua).
-- ARGV: [1] user id, [2] TTL ms, [3] session id, [4] token (the handle's secret,
--   fresh per call, so it also makes a retried call recognisable).
-- Returns {1, seq, created_ms, deadline_ms} when created (or when this very call
-- already created it: same token); {0} when another live session has this id.
-- Invariant: an existing session is never overwritten; debris of an evicted one
-- is cleared first, so a new session never inherits old messages.
local SID, TOKEN = ARGV[3], ARGV[4]
local s = session_keys(SID)
local m = load_meta(s.meta, SID)
if m and m.token == TOKEN then
  return {1, m.seq, m.created, touch(s)}
end
if redis.call('EXISTS', s.meta) == 1 then
  return {0}
end
redis.call('DEL', s.messages, s.idem)
local seq = redis.call('INCR', SEQ)
redis.call('HSET', s.meta, 'user', USER, 'sid', SID, 'token', TOKEN, 'seq', seq,
           'created', int(NOW), 'updated', int(NOW), 'count', 0)
return {1, seq, NOW, touch(s)}
