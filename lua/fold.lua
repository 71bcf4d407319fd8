-- fold: replace the oldest rows of the window by ONE summary entry and archive them,
-- only if those rows are still exactly the ones the summary was written from.
-- KEYS: see _lib.lua; KEYS[5], the archive, is a LIST of fold records, oldest first.
-- ARGV[1..9]: see _lib.lua. ARGV[10]: epoch the fold was planned on; ARGV[11]:
-- absolute position of the window's first row when planned (the head); ARGV[12]: n,
-- how many rows at the head are folded; ARGV[13]: SHA1 hex of those n rows, each
-- framed as "<byte length>:<row>" and concatenated, or '=' followed by that framed
-- text itself (servers without redis.sha1hex, such as fakeredis); ARGV[14]: 0-based
-- index among the n of a row to keep right after the summary (the pinned first user
-- message), or -1; ARGV[15]: archive cap in records (0 = uncapped); ARGV[16]: the
-- archive record; ARGV[17]: the summary row. The archive's TTL is common ARGV[9].
-- Status: 1 folded, 0 conflict (the head moved or a folded row changed or a tool
-- result follows the fold; nothing was written, the reply brings the caller up to
-- date to plan again), 2 the token was already applied.
-- Invariant: a fold removes exactly the rows it was planned on, or nothing; rows
-- after them (appended meanwhile by any worker) stay, in order; the archive record
-- and the summary land together; the window never starts a tool-call group with
-- its results; it is a non-incremental change (base = version), so every other
-- worker reloads; head only grows (the rows kept keep their absolute positions).
local m = read_meta()
if m and replayed() then
  return sync_reply(2, m, 0, -1)
end
local n = tonumber(ARGV[12])
local keep = tonumber(ARGV[14])
local put = 1  -- rows put back at the head: the summary, then the pinned row if any
if keep >= 0 then
  put = 2
end
if not m or m.epoch ~= ARGV[10] or m.head ~= tonumber(ARGV[11]) or n < put or keep >= n then
  return sync_reply(0, m, 0, -1)
end
local rows = redis.call('LRANGE', WINDOW, 0, n - 1)
if #rows ~= n then
  return sync_reply(0, m, 0, -1)
end
local framed = {}
for i = 1, n do
  framed[i] = #rows[i] .. ':' .. rows[i]
end
local text = table.concat(framed)
local expected = ARGV[13]
local same
if string.sub(expected, 1, 1) == '=' then
  same = text == string.sub(expected, 2)
else
  same = redis.sha1hex(text) == expected
end
local after = redis.call('LINDEX', WINDOW, n)
if not same or (after and is_tool(after)) then
  return sync_reply(0, m, 0, -1)
end
redis.call('LTRIM', WINDOW, n, -1)
if keep >= 0 then
  redis.call('LPUSH', WINDOW, rows[keep + 1])
end
redis.call('LPUSH', WINDOW, ARGV[17])
bump(m)
m.head = m.head + n - put
m.base = m.version
reset_log(m)
redis.call('RPUSH', ARCHIVE, ARGV[16])
local cap = tonumber(ARGV[15])
if cap > 0 then
  redis.call('LTRIM', ARCHIVE, -cap, -1)
end
remember(m)
save(m, 'base', m.base)
touch()
return sync_reply(1, m, 0, -1)
