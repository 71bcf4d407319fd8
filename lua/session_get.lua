-- session_get: read a session (its latest rows, its state and the user's state),
-- refreshing its TTL unless asked not to.
-- KEYS: [1] index, [2] seq, [3] meta, [4] messages, [5] idem, [6] state,
--   [7] owner state (see session_lib.lua).
-- ARGV: [1] user id, [2] TTL ms, [3] session id, [4] how many of the latest rows
--   to return (-1: all), [5] '1' to refresh the TTL (a use), '0' not to (a peek,
--   as when listing); [6] '1' to also return the append ids remembered (an export
--   carries them), else '0'.
-- Returns {0} when there is no live session; else {1, token, seq, created_ms,
--   updated_ms, deadline_ms, n, n (key, value) pairs of session state, m, m pairs
--   of user state, [k, k append ids oldest first, when ARGV[6] is '1'], rows...}
--   (rows oldest first). Read in one script, the ids name exactly the appends
--   the rows hold (or held before trimming).
-- Invariant: never creates a session; leftovers of a gone one are removed.
local SID, LAST, TOUCH, WITH_IDS = ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]
local s = session_keys(SID)
local m = load_meta(s.meta, SID)
if not m then
  forget(s)
  return {0}
end
local deadline
if TOUCH == '1' then
  deadline = touch(s)
else
  deadline = tonumber(redis.call('ZSCORE', INDEX, SID)) or (NOW + redis.call('PTTL', s.meta))
end
local reply = {1, m.token, m.seq, m.created, m.updated, deadline}
reply_hash(reply, s.state)
reply_hash(reply, s.owner_state)
if WITH_IDS == '1' then
  local ids = redis.call('ZRANGE', s.idem, 0, -1)
  reply[#reply + 1] = #ids
  for i = 1, #ids do
    reply[#reply + 1] = ids[i]
  end
end
if LAST ~= 0 then
  local start = 0
  if LAST > 0 then
    start = -LAST
  end
  local rows = redis.call('LRANGE', s.messages, start, -1)
  for i = 1, #rows do
    reply[#reply + 1] = rows[i]
  end
end
return reply
