-- fold: replace the oldest rows of the window by ONE summary entry and archive them,
-- only if those rows are still exactly the ones the summary was written from.
-- KEYS: see _lib.lua; KEYS[5], the archive, is laid out in _lib.lua ("The archive").
-- ARGV[1..9]: see _lib.lua. ARGV[10]: epoch the fold was planned on; ARGV[11]:
-- absolute position of the window's first row when planned (the head); ARGV[12]: n,
-- how many rows at the head are folded; ARGV[13]: the version it was planned at;
-- ARGV[14]: 0-based index among the n of a row to keep right after the summary (the
-- pinned first user message), or -1; ARGV[15]: archive cap in folds (0 = none);
-- ARGV[16]: archive cap in bytes (0 = none); ARGV[17]: the fold's id; ARGV[18]: how
-- many of its rows archive_stage.lua staged (0: this call archives them all);
-- ARGV[19], ARGV[20]: probes (_lib.lua) of the first and the last of the n rows;
-- ARGV[21]: the commit record (a JSON object with "seq"), without the count
-- of its rows: this script adds it; ARGV[22]: the summary row; ARGV[23]: how many rows
-- this call archives itself; ARGV[24..]: their 0-based inclusive index ranges (pairs).
-- The archive's TTL is common ARGV[9].
-- Status: 1 folded, 0 conflict (the head moved, a folded row changed since the plan,
-- a tool result follows the fold, or the staged rows are not all there; nothing was
-- written, the reply brings the caller up to date to plan again), 2 the token was
-- already applied.
-- Cost: O(log records since the plan + rows folded), and the bytes of the rows this
-- call archives itself (the caller keeps them to about a megabyte) plus the summary
-- and the pinned row; never the bytes of every folded row: the log, not a digest of
-- the rows, shows whether they changed.
-- Invariant: a fold removes exactly the rows it was planned on, or nothing; rows
-- after them (appended meanwhile by any worker) stay, in order; the fold's archived
-- rows (staged + its own) and its commit record become part of the archive together
-- with the summary, in this script; the window never starts a tool-call group with its
-- results; it is a non-incremental change (base = version), so every other worker
-- reloads, but the log keeps every record (changes.lua patches across it); head only grows (the rows kept keep their absolute positions).
local m = read_meta()
if m and replayed() then
  return sync_reply(2, m, 0, -1)
end
local head, n, planned = tonumber(ARGV[11]), tonumber(ARGV[12]), tonumber(ARGV[13])
local keep = tonumber(ARGV[14])
local cap_folds, cap_bytes = tonumber(ARGV[15]), tonumber(ARGV[16])
local id, staged = ARGV[17], tonumber(ARGV[18])
local own = tonumber(ARGV[23])
local put = 1  -- rows put back at the head: the summary, then the pinned row if any
if keep >= 0 then
  put = 2
end
if not archive_ranges_ok(24, n, own) then
  return redis.error_reply('fold: ranges outside the fold or not matching the count')
end
if n < put or keep >= n or not prefix_unchanged(m, ARGV[10], head, planned, n) then
  return sync_reply(0, m, 0, -1)
end
if probe(redis.call('LINDEX', WINDOW, 0)) ~= ARGV[19]
    or probe(redis.call('LINDEX', WINDOW, n - 1)) ~= ARGV[20] then
  return sync_reply(0, m, 0, -1)
end
local after = redis.call('LINDEX', WINDOW, n)
if after and is_tool(after) then
  return sync_reply(0, m, 0, -1)
end
local h = archive_read()
if staged > 0 and (h.stage ~= id or h.staged ~= staged) then
  return sync_reply(0, m, 0, -1)
end

-- The fold applies. What the caller needs to catch up is read before the log resets:
-- a caller at this epoch and head, patchable from the log (sync_reply's own test),
-- gets the summary (and pinned row) as replaced rows plus whatever it lacks after the
-- fold, not a snapshot of the kept window.
local len = redis.call('LLEN', WINDOW)
local caller_end = C_HEAD + C_LEN
local patch = nil
if m.known and C_HEAD == m.head and C_LEN >= n and caller_end <= m.head + len
    and C_VERSION <= m.version and C_VERSION >= m.base and C_VERSION >= m.logfloor then
  patch = {}
  if C_VERSION < m.version then
    local expected = log_expected(m)
    if expected and redis.call('LLEN', LOG) ~= expected then
      patch = nil
    else
      local records = redis.call('LRANGE', LOG, C_VERSION - m.version, -1)
      for _, pos in ipairs(log_positions_since(records, C_VERSION)) do
        if pos >= head + n and pos < caller_end then
          patch[#patch + 1] = pos
        end
      end
    end
  end
end

local pinned = nil
if keep >= 0 then
  pinned = redis.call('LINDEX', WINDOW, keep)
end
if staged == 0 then
  archive_discard_staged(h)
end
local pushed, bytes = archive_push_rows(24)
local rows = staged + pushed
-- The commit record says how many rows precede it (a reader checks that it got them).
local record = string.sub(ARGV[21], 1, -2) .. ',"rows":' .. rows .. '}'
redis.call('RPUSH', ARCHIVE, record)
local fold_bytes = h.staged_bytes + bytes + #record
local entry = (rows + 1) .. ':' .. fold_bytes
if h.ledger == '' then
  h.ledger = entry
else
  h.ledger = h.ledger .. ',' .. entry
end
h.committed = h.committed + rows + 1
h.bytes = h.bytes + fold_bytes
h.folds = h.folds + 1
h.stage, h.staged, h.staged_bytes = '', 0, 0
-- The caps drop whole folds, oldest first; the fold just made always stays.
local dropped, at = 0, 1
while h.folds > 1 and ((cap_folds > 0 and h.folds > cap_folds)
    or (cap_bytes > 0 and h.bytes > cap_bytes)) do
  local _, last, k, b = string.find(h.ledger, '^(%d+):(%d+),?', at)
  k, b = tonumber(k), tonumber(b)
  dropped = dropped + k
  h.committed = h.committed - k
  h.bytes = h.bytes - b
  h.folds = h.folds - 1
  at = last + 1
end
if dropped > 0 then
  h.ledger = string.sub(h.ledger, at)
  h.dropped = h.dropped + dropped
  local base = h.present and 1 or 0
  -- The header goes with them (one LTRIM); archive_write puts the new one in front.
  redis.call('LTRIM', ARCHIVE, base + dropped, -1)
  h.present = false
end
archive_write(h)

redis.call('LTRIM', WINDOW, n, -1)
if pinned then
  redis.call('LPUSH', WINDOW, pinned)
end
redis.call('LPUSH', WINDOW, ARGV[22])
-- The log is kept, and the rows put at the head are logged like edits: a change
-- reader (changes.lua) behind the fold is patched from it; rbase, the version
-- before which that cannot work (a clear or rewrite), is left where it was.
local rbase = redis.call('HGET', META, 'rbase') or m.base
bump(m)
m.head = m.head + n - put
m.base = m.version
log_replace(m, m.head)
if pinned then
  log_replace(m, m.head + 1)
end
remember(m)
save(m, 'base', m.base, 'foldv', m.version, 'rbase', rbase)
touch(true)
if not patch then
  return sync_reply(1, m, 0, -1)
end
local reply = {1, 1, m.version, m.tag, m.head, m.limit, m.rebackfill, 0, 0, m.head, ARGV[22]}
local count = 1
if pinned then
  reply[#reply + 1] = m.head + 1
  reply[#reply + 1] = pinned
  count = 2
end
for i = 1, #patch do
  reply[#reply + 1] = patch[i]
  reply[#reply + 1] = redis.call('LINDEX', WINDOW, patch[i] - m.head)
  count = count + 1
end
reply[9] = count
local tail = redis.call('LRANGE', WINDOW, caller_end - m.head, -1)
for i = 1, #tail do
  reply[#reply + 1] = tail[i]
end
return reply
