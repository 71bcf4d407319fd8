-- session_get: read a whole session and refresh its TTL (a session in use by
-- reads alone must not expire).
-- KEYS: [1] index, [2] seq, [3] meta, [4] messages, [5] idem (see session_lib.lua).
-- ARGV: [1] user id, [2] TTL ms, [3] session id.
-- Returns {0} when there is no live session; else
--   {1, token, seq, created_ms, updated_ms, deadline_ms, rows...} (oldest first).
-- Invariant: never creates a session; leftovers of a gone one are removed.
local SID = ARGV[3]
local s = session_keys(SID)
local m = load_meta(s.meta, SID)
if not m then
  forget(s)
  return {0}
end
local reply = {1, m.token, m.seq, m.created, m.updated, touch(s)}
local rows = redis.call('LRANGE', s.messages, 0, -1)
for i = 1, #rows do
  reply[#reply + 1] = rows[i]
end
return reply
