-- session_import: write an exported session under this user, in one step.
-- KEYS: [1] index, [2] seq, [3] meta, [4] messages, [5] idem, [6] state, [7] owner state
--   (see session_lib.lua).
-- ARGV: [1] user id, [2] TTL ms, [3] session id, [4] token (the new handle's secret),
--   [5] '1' to replace a live session with this id, else '0'; [6] the exported
--   creation time (ms); [7] the message cap; [8] n, then n (key, orjson value)
--   pairs of the session's state; then k and k append ids (the exported session's
--   remembered idempotency keys, oldest first); then the rows, oldest first.
-- Returns {0, count} refused (a live session has this id and ARGV[5] is not '1';
-- nothing was written), or {1, seq, created_ms, updated_ms, deadline_ms, count} imported.
-- Invariant: all or nothing; the session gets a new token, so a handle to what it
-- replaced can no longer write, and none of its messages or state is kept; the
-- cap and tool-group rule hold as for appends; an append retried under one of the
-- imported ids is applied once, as on the session it came from.
local SID, TOKEN = ARGV[3], ARGV[4]
local s = session_keys(SID)
local m = load_meta(s.meta, SID)
if m and ARGV[5] ~= '1' then
  return {0, m.count}
end
local state, ids_at = read_pairs(8)
local n_ids = tonumber(ARGV[ids_at])
local first_row = ids_at + 1 + n_ids
redis.call('DEL', s.meta, s.messages, s.idem, s.state)
write_pairs(s.state, state)
for i = 1, n_ids do
  remember(s, ARGV[ids_at + i])
end
for i = first_row, #ARGV, PUSH_CHUNK do
  redis.call('RPUSH', s.messages, unpack(ARGV, i, math.min(i + PUSH_CHUNK - 1, #ARGV)))
end
trim(s.messages, tonumber(ARGV[7]))
local count = redis.call('LLEN', s.messages)
local seq = redis.call('INCR', SEQ)
redis.call('HSET', s.meta, 'user', USER, 'sid', SID, 'token', TOKEN, 'seq', seq,
           'created', ARGV[6], 'updated', int(NOW), 'count', count)
return {1, seq, tonumber(ARGV[6]), NOW, touch(s), count}
