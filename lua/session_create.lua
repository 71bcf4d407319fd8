-- session_create: start a session under a new id, unless the id is taken, with
-- its initial state and a first write to the user's state.
-- KEYS: [1] index, [2] seq, [3] meta, [4] messages, [5] idem, [6] state,
--   [7] owner state (see session_lib.lua).
-- ARGV: [1] user id, [2] TTL ms, [3] session id, [4] token (the handle's secret,
--   fresh per call, so it also makes a retried call recognisable), [5] n, then n
--   (key, orjson value) pairs of session state, then m and m pairs of user state.
-- Returns {1, seq, created_ms, deadline_ms} when created (or when this very call
-- already created it: same token); {0} when another live session has this id.
-- Invariant: an existing session is never overwritten, nor the user's state
-- written for a create that did not happen; debris of an evicted session is
-- cleared first, so a new session never inherits old messages or state.
local SID, TOKEN = ARGV[3], ARGV[4]
local s = session_keys(SID)
local m = load_meta(s.meta, SID)
if m and m.token == TOKEN then
  return {1, m.seq, m.created, touch(s)}
end
if redis.call('EXISTS', s.meta) == 1 then
  return {0}
end
local state, at = read_pairs(5)
local owner_state = read_pairs(at)
redis.call('DEL', s.messages, s.idem, s.state)
write_pairs(s.state, state)
write_pairs(s.owner_state, owner_state)
local seq = redis.call('INCR', SEQ)
redis.call('HSET', s.meta, 'user', USER, 'sid', SID, 'token', TOKEN, 'seq', seq,
           'created', int(NOW), 'updated', int(NOW), 'count', 0)
return {1, seq, NOW, touch(s)}
