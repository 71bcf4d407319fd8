-- session_append: push a batch of rows to a live session and apply state deltas
-- with them, trim it to its cap, refresh its TTL; once per write id.
-- KEYS: [1] index, [2] seq, [3] meta, [4] messages, [5] idem, [6] state,
--   [7] owner state (see session_lib.lua).
-- ARGV: [1] user id, [2] TTL ms, [3] session id, [4] '1' to require the token,
--   '0' when the caller is authorised by user id alone, [5] token, [6] cap,
--   [7] write id (fresh per call), [8] n, then n (key, orjson value) pairs of
--   session state, then m and m pairs of user state, then the rows, oldest first.
-- Returns {1, count, created_ms, updated_ms, deadline_ms, dropped} when applied
-- (dropped = rows trimmed; also when this write id was already applied, with
-- dropped = 0 and nothing pushed or set again); {0} when there is no live
-- session; {2} when the token does not match (a forged handle, or a stale one
-- from before a delete and re-create).
-- Invariant: a batch and its state deltas land whole or not at all, at most once
-- per write id; only an existing session of this user is written; the list never
-- starts with a tool result whose assistant call was trimmed away.
local SID, CHECK, TOKEN = ARGV[3], ARGV[4], ARGV[5]
local CAP, WRITE_ID = tonumber(ARGV[6]), ARGV[7]
local s = session_keys(SID)
local m = load_meta(s.meta, SID)
if not m then
  forget(s)
  return {0}
end
if CHECK == '1' and m.token ~= TOKEN then
  return {2}
end
local dropped = 0
if not seen(s, WRITE_ID) then
  local state, at = read_pairs(8)
  local owner_state, rows_at = read_pairs(at)
  write_pairs(s.state, state)
  write_pairs(s.owner_state, owner_state)
  for i = rows_at, #ARGV, PUSH_CHUNK do
    redis.call('RPUSH', s.messages, unpack(ARGV, i, math.min(i + PUSH_CHUNK - 1, #ARGV)))
  end
  dropped = trim(s.messages, CAP)
  m.updated = NOW
  remember(s, WRITE_ID)
end
local count = redis.call('LLEN', s.messages)
redis.call('HSET', s.meta, 'updated', int(m.updated), 'count', count)
return {1, count, m.created, m.updated, touch(s), dropped}
