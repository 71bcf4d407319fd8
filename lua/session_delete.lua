-- session_delete: remove a session, its state and its index entry.
-- KEYS: [1] index, [2] seq, [3] meta, [4] messages, [5] idem, [6] state,
--   [7] owner state (see session_lib.lua; the user's state is kept).
-- ARGV: [1] user id, [2] TTL ms (unused), [3] session id.
-- Returns 1 when a live session was deleted, 0 when there was none.
-- Invariant: only this user's session is removed; the index never keeps a
-- member for a deleted session; the user's state outlives the session.
local SID = ARGV[3]
local s = session_keys(SID)
if load_meta(s.meta, SID) then
  redis.call('DEL', s.meta, s.messages, s.idem, s.state)
  redis.call('ZREM', INDEX, SID)
  settle_index()
  return 1
end
forget(s)
return 0
