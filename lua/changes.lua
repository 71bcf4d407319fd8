-- changes: what changed in a room since a change-feed cursor, in one round trip.
-- KEYS and common ARGV: see _lib.lua. The caller state ARGV[1..4] is the cursor's:
-- epoch, version, head and length, meaning "I hold the rows [head, head + length)
-- as they were at that version" (a cursor inside a batch may hold fewer rows than
-- the window had then: the rest are served as tail rows).
-- Reply: {reason, folded, <a sync reply without its status (see _lib.lua)>}:
--   reason 'i'  incremental, or nothing changed (kind 0 or 1)
--          'c'  the room was cleared since the cursor: a snapshot of what it holds now
--          'r'  the cursor cannot be served incrementally (another epoch, a rewrite,
--               the log no longer reaches back to it, a cursor that does not fit
--               this room): a snapshot
--   folded 1 if a consolidation fold happened after the cursor's version, else 0.
-- Unlike sync.lua, a caller behind a fold is still patched from the log: fold.lua
-- keeps the log and logs the rows it puts at the head, so only a clear or a rewrite
-- (rbase, the reader base) cuts a change reader off.
-- Read-only: never creates, refreshes or changes a key. Cost: O(log records, at most
-- LOG_CAP) plus the rows sent.
local m = read_meta()
local len = redis.call('LLEN', WINDOW)
local caller_end = C_HEAD + C_LEN

local function snap(reason)
  local reply = snapshot(reason, m or {epoch = '', version = 0, head = 0, limit = 0,
                                       rebackfill = 0})
  table.insert(reply, 2, 0)
  return reply
end

if m == nil then
  -- A room nobody wrote (or rows whose meta was lost): nothing to say to a caller
  -- that holds what is there, a snapshot to anyone else.
  if C_EPOCH == '' and C_VERSION == 0 and C_HEAD == 0 and C_LEN == len then
    return {'i', 0, 0, 0, ''}
  end
  return snap('r')
end

local marks = redis.call('HMGET', META, 'rbase', 'clearv', 'foldv')
local rbase = tonumber(marks[1]) or m.base
local clearv = tonumber(marks[2]) or -1
local foldv = tonumber(marks[3]) or -1

if not m.known or C_VERSION > m.version then
  return snap('r')
end
if C_VERSION < rbase then
  if clearv == rbase then
    return snap('c')
  end
  return snap('r')
end
if C_VERSION < m.logfloor or C_HEAD > m.head or caller_end > m.head + len then
  return snap('r')
end
if C_VERSION == m.version and C_HEAD == m.head and caller_end == m.head + len then
  return {'i', 0, 0, m.version, m.tag or ''}
end
local expected = log_expected(m)
if C_VERSION < m.version and expected and redis.call('LLEN', LOG) ~= expected then
  return snap('r')
end

local folded = (C_VERSION < foldv) and 1 or 0
local tail_start = math.max(caller_end, m.head)
local reply = {'i', folded, 1, m.version, m.tag or '', m.head, m.limit, m.rebackfill, 0, 0}
local n = 0
if C_VERSION < m.version then
  -- A fold logs two records under one version, so records are read until the first
  -- one at or below the caller's version, not counted.
  local records = redis.call('LRANGE', LOG, 0, -1)
  for _, pos in ipairs(log_positions_since(records, C_VERSION)) do
    if pos >= m.head and pos < tail_start then
      reply[#reply + 1] = pos
      reply[#reply + 1] = redis.call('LINDEX', WINDOW, pos - m.head)
      n = n + 1
    end
  end
end
reply[10] = n
local tail_from = tail_start - m.head
if len - 1 >= tail_from then
  local tail = redis.call('LRANGE', WINDOW, tail_from, -1)
  for i = 1, #tail do
    reply[#reply + 1] = tail[i]
  end
end
return reply
