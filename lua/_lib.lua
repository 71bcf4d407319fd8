-- Shared prelude: the loader prepends this file to every other script here, so
-- each script below is "this prelude + its own body", loaded and called by SHA.
--
-- KEYS (every script, all sharing the room's hash tag {<room_id>}):
--   [1] window  LIST of rows (orjson entries, identity and role first)
--   [2] meta    HASH epoch, version, head, base, logfloor, limit, rebackfill, iseq,
--               replays (writes whose token had already applied)
--   [3] log     LIST of "<version>:<absolute position>" for replaced rows (capped)
--   [4] idem    ZSET of idempotency tokens of applied writes, scored by meta's
--               iseq counter (the newest IDEM_CAP at least are kept)
-- ARGV (every script): [1] caller epoch ('' = knows nothing), [2] caller version,
--   [3] caller head, [4] caller length (the caller's synced window), [5] idempotency
--   token ('' = none), [6] TTL in ms (0 = keys do not expire), [7] default window
--   limit, [8] fresh epoch to adopt when the room has no meta yet.
--
-- Invariants kept by every script:
--   * version only grows within an epoch; every mutation advances it by one;
--   * head is the absolute position of window[0]; it only grows until a
--     non-incremental change (clear, rewrite), which also sets base = version;
--   * a caller at (epoch, version >= max(base, logfloor)) can be brought up to
--     date from head, length and the log alone; anyone else gets a snapshot.
--
-- Every script returns a sync reply, prefixed by its own status:
--   {status, 0, version}                                   nothing changed
--   {status, 1, version, head, limit, rebackfill, own_k, n,
--        pos_1, row_1, ..., pos_n, row_n, tail rows...}    incremental
--   {status, 2, epoch, version, head, limit, rebackfill, rows...}  snapshot
-- own_k: how many of the caller's own just-appended rows end the window (not
-- echoed back); pos_i/row_i: rows replaced since the caller's version that lie
-- inside what the caller holds; tail rows: rows past the caller's end.

local unpack = unpack or table.unpack

local WINDOW, META, LOG, IDEM = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local C_EPOCH = ARGV[1]
local C_VERSION = tonumber(ARGV[2])
local C_HEAD = tonumber(ARGV[3])
local C_LEN = tonumber(ARGV[4])
local TOKEN = ARGV[5]
local TTL = tonumber(ARGV[6])
local DEFAULT_LIMIT = tonumber(ARGV[7])
local FRESH_EPOCH = ARGV[8]
local LOG_CAP = 256
local IDEM_CAP = 1024
-- The ZSET is trimmed by score once every IDEM_TRIM_EVERY writes, not on every
-- write: it holds between IDEM_CAP and IDEM_CAP + IDEM_TRIM_EVERY tokens.
local IDEM_TRIM_EVERY = 64
local PUSH_CHUNK = 1000

-- The epoch workers hold is the stored epoch plus the replication id of the
-- primary that answers. A replica promoted by a failover has a new replication
-- id, and it may have missed the last writes, whose versions it will then reuse
-- for other rows: a worker that saw those writes must reload, not patch.
-- Workers send the epoch back with every call, so it is kept short: 8 hex
-- digits of the replication id tell two primaries apart but for a 2**-32
-- chance per failover. (INFO is refused by some script engines, such as
-- fakeredis's: no suffix there.)
local function primary_suffix()
  local ok, info = pcall(redis.call, 'INFO', 'replication')
  if not ok or type(info) ~= 'string' then
    return ''
  end
  local id = string.match(info, 'master_replid:(%x%x%x%x%x%x%x%x)')
  if not id then
    return ''
  end
  return '@' .. id
end

local function read_meta()
  local m = redis.call('HMGET', META, 'epoch', 'version', 'head', 'base', 'logfloor',
                       'limit', 'rebackfill', 'iseq')
  if not m[1] then
    return nil
  end
  return {
    epoch = m[1] .. primary_suffix(),
    version = tonumber(m[2]) or 0,
    head = tonumber(m[3]) or 0,
    base = tonumber(m[4]) or 0,
    logfloor = tonumber(m[5]) or 0,
    limit = tonumber(m[6]) or 0,
    rebackfill = tonumber(m[7]) or 0,
    iseq = tonumber(m[8]), -- nil: not counted yet (see remember)
  }
end

-- A writer on a room without meta (new, expired, flushed, evicted) starts a new
-- epoch: no worker may apply its old positions to it. Rows that survived
-- without their meta are adopted, never deleted.
local function ensure_meta()
  local m = read_meta()
  if m then
    return m
  end
  redis.call('DEL', LOG)
  redis.call('HSET', META, 'epoch', FRESH_EPOCH, 'version', 0, 'head', 0, 'base', 0,
             'logfloor', 0)
  return {epoch = FRESH_EPOCH .. primary_suffix(), version = 0, head = 0, base = 0,
          logfloor = 0, limit = 0, rebackfill = 0}
end

-- Every redis.call costs about a microsecond of script overhead, so a write
-- changes m in Lua (bump, trim, remember) and stores version, head, logfloor and
-- iseq with ONE HSET at the end (save). The script is atomic, so reading the
-- version once and writing version + 1 is the same as HINCRBY.
local function bump(m)
  m.version = m.version + 1
end

-- ...: more field/value pairs a script changed (base, limit, rebackfill).
local function save(m, ...)
  if m.iseq then
    redis.call('HSET', META, 'version', m.version, 'head', m.head, 'logfloor', m.logfloor,
               'iseq', m.iseq, ...)
  else
    redis.call('HSET', META, 'version', m.version, 'head', m.head, 'logfloor', m.logfloor, ...)
  end
end

local function touch()
  if TTL > 0 then
    redis.call('PEXPIRE', WINDOW, TTL)
    redis.call('PEXPIRE', META, TTL)
    redis.call('PEXPIRE', LOG, TTL)
    redis.call('PEXPIRE', IDEM, TTL)
  end
end

local function seen()
  return TOKEN ~= '' and redis.call('ZSCORE', IDEM, TOKEN) ~= false
end

-- For writes: whether the token already applied. A replay still writes (a
-- counter in meta), so a WAIT after it on any connection (min_replicas) also
-- waits for the replication of the first attempt, which came before it.
local function replayed()
  if seen() then
    redis.call('HINCRBY', META, 'replays', 1)
    return true
  end
  return false
end

-- Scores are meta's iseq counter, not versions: versions restart in a new epoch,
-- iseq survives clear. A meta without iseq (new, or written by an older engine)
-- continues from the highest score the ZSET holds. save(m) stores m.iseq.
local function remember(m)
  if TOKEN == '' then
    return
  end
  local seq = m.iseq
  if not seq then
    local last = redis.call('ZRANGE', IDEM, -1, -1, 'WITHSCORES')
    seq = tonumber(last[2]) or 0
  end
  seq = seq + 1
  m.iseq = seq
  redis.call('ZADD', IDEM, seq, TOKEN)
  if seq % IDEM_TRIM_EVERY == 0 then
    -- Scores are consecutive, so this keeps exactly the newest IDEM_CAP tokens.
    redis.call('ZREMRANGEBYSCORE', IDEM, '-inf', seq - IDEM_CAP)
  end
end

-- Returns the window's length after the push (RPUSH's reply): callers need it
-- and an LLEN would be one more call.
local function push_rows(first, last)
  local len = 0
  for i = first, last, PUSH_CHUNK do
    len = redis.call('RPUSH', WINDOW, unpack(ARGV, i, math.min(i + PUSH_CHUNK - 1, last)))
  end
  return len
end

local function is_tool(row)
  local at = string.find(row, ',"role":"', 1, true)
  return at ~= nil and string.sub(row, at + 9, at + 13) == 'tool"'
end

local function is_summary(row)
  return string.sub(row, 1, 23) == '{"message_id":"summary:'
      and string.find(row, ',"role":"system"', 1, true) ~= nil
end

local log_replace

-- Drop rows from the front down to the limit; if anything was dropped, also drop
-- tool results left at the front without the assistant call they answer. A
-- consolidation summary at the head stands for everything before it, so it
-- stays: the rows after it go instead, and it moves onto the first kept slot
-- (logged as a replaced row, so catch-up stays incremental).
-- len: the window's length if the caller knows it (nil: read it). Sets m.head;
-- save(m) stores it. Returns how many rows were dropped.
local function trim(m, len)
  local limit = m.limit
  if limit <= 0 then
    limit = DEFAULT_LIMIT
  end
  len = len or redis.call('LLEN', WINDOW)
  if len <= limit then
    return 0
  end
  local drop = len - limit
  local first = redis.call('LINDEX', WINDOW, 0)
  local keep_summary = limit > 1 and is_summary(first)
  local next_kept = drop
  if keep_summary then
    next_kept = drop + 1
  end
  while next_kept < len and is_tool(redis.call('LINDEX', WINDOW, next_kept)) do
    drop = drop + 1
    next_kept = next_kept + 1
  end
  if keep_summary and drop < len then
    redis.call('LSET', WINDOW, drop, first)
  end
  redis.call('LTRIM', WINDOW, drop, -1)
  m.head = m.head + drop
  if keep_summary and drop < len then
    log_replace(m, m.head)
    m.summary_moved = true
  end
  return drop
end

-- Sets m.logfloor when records fall off; save(m) stores it.
log_replace = function(m, pos)
  local n = redis.call('RPUSH', LOG, m.version .. ':' .. pos)
  if n > LOG_CAP then
    local dropped = redis.call('LPOP', LOG, n - LOG_CAP)
    local last = dropped[#dropped]
    m.logfloor = tonumber(string.sub(last, 1, string.find(last, ':', 1, true) - 1))
  end
end

local function snapshot(status, m)
  local reply = {status, 2, m.epoch, m.version, m.head, m.limit, m.rebackfill}
  local rows = redis.call('LRANGE', WINDOW, 0, -1)
  for i = 1, #rows do
    reply[#reply + 1] = rows[i]
  end
  return reply
end

-- own_k: rows the caller just appended (they end the window; not echoed back).
-- own_pos: absolute position the caller just replaced (not echoed back), or -1.
local function sync_reply(status, m, own_k, own_pos)
  if m == nil then
    -- No meta: a room nobody wrote, or rows whose meta was evicted. Serve the
    -- rows as they are under the empty epoch; the next writer starts a real one.
    if C_EPOCH == '' and C_VERSION == 0 and C_LEN == 0
        and redis.call('LLEN', WINDOW) == 0 then
      return {status, 0, 0}
    end
    return snapshot(status, {epoch = '', version = 0, head = 0, limit = 0, rebackfill = 0})
  end
  local len = redis.call('LLEN', WINDOW)
  local caller_end = C_HEAD + C_LEN
  if C_EPOCH ~= m.epoch or C_VERSION > m.version or C_VERSION < m.base
      or C_VERSION < m.logfloor or C_HEAD > m.head or caller_end > m.head + len then
    return snapshot(status, m)
  end
  if C_VERSION == m.version then
    return {status, 0, m.version}
  end
  local tail_start = math.max(caller_end, m.head)
  local reply = {status, 1, m.version, m.head, m.limit, m.rebackfill, own_k, 0}
  -- Each version logs at most one record, so the records newer than the caller
  -- are among the last (version - caller version): read only those.
  local records = redis.call('LRANGE', LOG, C_VERSION - m.version, -1)
  local sent = {}
  local n = 0
  for i = #records, 1, -1 do
    local record = records[i]
    local sep = string.find(record, ':', 1, true)
    if tonumber(string.sub(record, 1, sep - 1)) <= C_VERSION then
      break
    end
    local pos = tonumber(string.sub(record, sep + 1))
    if pos >= m.head and pos < tail_start and pos ~= own_pos and not sent[pos] then
      sent[pos] = true
      reply[#reply + 1] = pos
      reply[#reply + 1] = redis.call('LINDEX', WINDOW, pos - m.head)
      n = n + 1
    end
  end
  reply[8] = n
  local tail_from = tail_start - m.head
  local tail_to = len - 1 - own_k
  if tail_to >= tail_from then
    local tail = redis.call('LRANGE', WINDOW, tail_from, tail_to)
    for i = 1, #tail do
      reply[#reply + 1] = tail[i]
    end
  end
  return reply
end

-- The reply to a caller that was exactly up to date before this write (same
-- epoch, version, head and length) when the write logged no replaced row the
-- caller must get: what sync_reply returns then, without its LLEN and LRANGE
-- calls. Only the caller's own rows or row changed, and those are not echoed.
local function own_reply(status, m, own_k)
  return {status, 1, m.version, m.head, m.limit, m.rebackfill, own_k, 0}
end
