-- session_list: describe the given sessions of one user (no messages) and prune
-- index members whose session is gone. Does not refresh any TTL: listing is not
-- using a session.
-- KEYS: [1] index, [2] seq, [3..] meta of each session asked about (see
--   session_lib.lua).
-- ARGV: [1] user id, [2] TTL ms (unused), [3..] the session id of each meta key,
--   in the same order.
-- Returns a flat list, six fields per live session:
--   {sid, seq, created_ms, updated_ms, deadline_ms, count, ...}
-- Invariant: after it runs, no asked-about member of the index names a session
-- that has expired or lost its meta.
settle_index()
local reply = {}
for i = 3, #KEYS do
  local sid = ARGV[i]
  local deadline = redis.call('ZSCORE', INDEX, sid)
  if deadline then
    local m = load_meta(KEYS[i], sid)
    if m then
      reply[#reply + 1] = sid
      reply[#reply + 1] = m.seq
      reply[#reply + 1] = m.created
      reply[#reply + 1] = m.updated
      reply[#reply + 1] = tonumber(deadline)
      reply[#reply + 1] = m.count
    elseif redis.call('EXISTS', KEYS[i]) == 0 then
      redis.call('ZREM', INDEX, sid)
    end
  end
end
settle_index()
return reply
