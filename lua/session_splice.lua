-- session_splice: change a session's rows by position, as list-shaped chat stores
-- do (LlamaIndex's), creating the session on first write; once per write id.
-- KEYS: [1] index, [2] seq, [3] meta, [4] messages, [5] idem, [6] state,
--   [7] owner state (see session_lib.lua).
-- ARGV: [1] user id, [2] TTL ms, [3] session id, [4] op, [5] position (an int,
--   Python-style: negative counts from the end), [6] cap, [7] write id (fresh per
--   call), [8] token for a session this call creates, [9..] rows, oldest first.
--   op is one of:
--     'set'    replace every row by the given rows (creates the session);
--     'insert' insert the rows before the position, clamped to the list as
--              Python's list.insert does (creates the session);
--     'remove' remove the row at the position;
--     'pop'    remove the last row;
--     'take'   delete the whole session and return its rows.
-- Returns {1, count, row...}: the rows removed ('remove', 'pop': at most one;
-- 'take': all); {0} when there is no live session ('remove', 'pop', 'take') or no
-- row at the position; {3} when this write id was already applied (a retried call).
-- Invariant: one call is one atomic change of one session of this user; a write
-- id is applied at most once; rows never outnumber the cap (oldest dropped).
local SID, OP, POS = ARGV[3], ARGV[4], tonumber(ARGV[5])
local CAP, WRITE_ID, TOKEN = tonumber(ARGV[6]), ARGV[7], ARGV[8]
local ROWS_AT = 9
local s = session_keys(SID)
local m = load_meta(s.meta, SID)
local creates = OP == 'set' or OP == 'insert'
if not m then
  forget(s)
  if not creates then
    return {0}
  end
  redis.call('DEL', s.messages, s.idem, s.state)
  local seq = redis.call('INCR', SEQ)
  redis.call('HSET', s.meta, 'user', USER, 'sid', SID, 'token', TOKEN, 'seq', seq,
             'created', int(NOW), 'updated', int(NOW), 'count', 0)
elseif seen(s, WRITE_ID) then
  touch(s)
  return {3}
end

local function push_rows(from)
  for i = from, #ARGV, PUSH_CHUNK do
    redis.call('RPUSH', s.messages, unpack(ARGV, i, math.min(i + PUSH_CHUNK - 1, #ARGV)))
  end
end

-- A Python index into a list of len rows: the 0-based position, or nil.
local function at(pos, len)
  if pos < 0 then
    pos = pos + len
  end
  if pos < 0 or pos >= len then
    return nil
  end
  return pos
end

local removed = {}
local len = redis.call('LLEN', s.messages)
if OP == 'take' then
  removed = redis.call('LRANGE', s.messages, 0, -1)
  redis.call('DEL', s.meta, s.messages, s.idem, s.state)
  redis.call('ZREM', INDEX, SID)
  settle_index()
  local reply = {1, 0}
  for i = 1, #removed do
    reply[#reply + 1] = removed[i]
  end
  return reply
elseif OP == 'set' then
  redis.call('DEL', s.messages)
  push_rows(ROWS_AT)
elseif OP == 'insert' then
  local pos = POS
  if pos < 0 then
    pos = math.max(pos + len, 0)
  end
  if pos >= len then
    push_rows(ROWS_AT)
  else
    local tail = redis.call('LRANGE', s.messages, pos, -1)
    redis.call('LTRIM', s.messages, 0, pos - 1)
    if pos == 0 then
      redis.call('DEL', s.messages)
    end
    push_rows(ROWS_AT)
    for i = 1, #tail, PUSH_CHUNK do
      redis.call('RPUSH', s.messages, unpack(tail, i, math.min(i + PUSH_CHUNK - 1, #tail)))
    end
  end
elseif OP == 'remove' or OP == 'pop' then
  local pos = len - 1
  if OP == 'remove' then
    pos = at(POS, len)
  end
  if pos == nil or pos < 0 then
    touch(s)
    return {0}
  end
  removed = {redis.call('LINDEX', s.messages, pos)}
  -- LSET to a value no row can hold (rows start with '{'), then remove it.
  local hole = '\0removed:' .. WRITE_ID
  redis.call('LSET', s.messages, pos, hole)
  redis.call('LREM', s.messages, 1, hole)
else
  return redis.error_reply('session_splice: unknown op ' .. OP)
end
trim(s.messages, CAP)
remember(s, WRITE_ID)
local count = redis.call('LLEN', s.messages)
redis.call('HSET', s.meta, 'updated', int(NOW), 'count', count)
touch(s)
local reply = {1, count}
for i = 1, #removed do
  reply[#reply + 1] = removed[i]
end
return reply
