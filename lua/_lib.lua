-- Shared prelude of the room scripts: each script here is "this prelude + its own
-- body" (see bind() below for how the loader puts them together).
--
-- KEYS (every script, all sharing the room's hash tag {<room_id>}; sync.lua takes
-- only [1..4], the keys it reads):
--   [1] window  LIST of rows (orjson entries, identity and role first)
--   [2] meta    HASH epoch, version, head, base, logfloor, logn, limit, rebackfill,
--               iseq, replays (writes whose token had already applied); for the change
--               feed (changes.lua): rbase (the last clear or rewrite: readers older
--               than it cannot be patched), clearv (the last clear), foldv (the last fold)
--   [3] log     LIST of "<version>:<absolute position>" for replaced rows (capped);
--               logn counts the records pushed since it was last reset, so a log
--               that lost records (evicted alone) is noticed, never trusted
--   [4] idem    ZSET of idempotency tokens of applied writes, scored by meta's
--               iseq counter (the newest IDEM_CAP at least are kept)
--   [5] archive LIST: a header, then fold records (see "The archive" below); only
--               fold.lua and archive_stage.lua write it, every write refreshes its TTL
--   [6] reactions HASH message identity -> that message's tracked reactions
--               (react.lua writes it, import.lua an export's, replace.lua forgets a
--               field, clear.lua drops it)
--   [7] deferred HASH events for messages the room does not hold yet (see "Deferred
--               events" below); defer.lua writes it (import.lua an export's), append.lua
--               applies and drops it
--   [8] cursors HASH the room's named change-feed cursors (cursor_set.lua writes
--               it); room scripts only refresh its TTL in touch(), and clear keeps it
-- Every key but the deferred hash (which expires with its newest event) expires
-- TTL after the room was last written, give or take a quarter (see touch).
-- ARGV (every script): [1] caller epoch ('' = knows nothing), followed by '/' and
--   the tag of the caller's version when it has one (see "Lineage tags" below),
--   [2] caller version,
--   [3] caller head, [4] caller length (the caller's synced window), [5] idempotency
--   token ('' = none), [6] TTL in ms (0 = keys do not expire), [7] default window
--   limit, [8] fresh epoch to adopt when the room has no meta yet (its first 8
--   characters also tag the versions this call creates; '': the token's do),
--   [9] archive TTL in ms
--   (0 = the archive does not expire).
--
-- Invariants kept by every script:
--   * version only grows within an epoch; every mutation advances it by one;
--   * head is the absolute position of window[0]; it only grows until a
--     non-incremental change (clear, rewrite), which also sets base = version;
--   * a caller at (epoch, version >= max(base, logfloor)) can be brought up to
--     date from head, length and the log alone, provided the log holds every
--     record logn says it should; anyone else gets a snapshot.
--
-- Lineage tags: meta also holds `tag`, "<version>:<tag>" of the last version this
-- engine tagged, and a ring
-- t0 .. t<TAG_RING - 1>, field t<v mod TAG_RING> the tag of version v. A tag is 8
-- random hex digits chosen by the call that created the version. Workers hold the
-- tag of the version they are at and send it back; a caller whose tag is not the
-- one this server stored for its version saw writes this server never had (a
-- replica promoted before it got them, or a restart that lost the tail of its
-- AOF, which then reuses their versions for other rows): it gets a snapshot, never
-- a patch. A caller older than the ring cannot be checked, so it gets a snapshot
-- too. The caller's slot is read in read_meta's one HMGET and the tags are stored
-- in save()'s one HSET: this costs no redis.call. A room whose current version no
-- script tagged (written by an older engine, as during a rolling deploy) has
-- nothing to check: callers are trusted on their epoch, as before tags.
--
-- Every script returns a sync reply, prefixed by its own status:
--   {status, 0, version, tag}                               nothing changed
--   {status, 1, version, tag, head, limit, rebackfill, own_k, n,
--        pos_1, row_1, ..., pos_n, row_n, tail rows...}    incremental
--   {status, 2, epoch, version, tag, head, limit, rebackfill, rows...}  snapshot
--   {status, 3, epoch, version, tag, head, limit, rebackfill}  snapshot whose
--        rows are the reply of the LRANGE that follows in the caller's MULTI
--        (sync.lua only, when its caller asks; see snapshot)
-- tag: the tag of the reply's version ('' when the room has none).
-- own_k: how many of the caller's own just-appended rows end the window (not
-- echoed back); pos_i/row_i: rows replaced since the caller's version that lie
-- inside what the caller holds; tail rows: rows past the caller's end.

-- Lua 5.1 (Redis) has unpack, 5.4 (fakeredis) table.unpack. Globals other than
-- redis are only there when a call runs (not while a function library loads), so
-- bind() takes it; this function, defined before the local, reads the global.
local function global_unpack()
  return unpack or table.unpack
end
local unpack

-- Per-call state: bound from KEYS and ARGV by bind() when a call starts. The loader
-- builds two forms of every script from these files (conversation/_redis/scripts.py):
-- for EVALSHA, this prelude then `bind(KEYS, ARGV)` then the script's body; for a
-- Redis Function library, this prelude once, then per script a function that calls
-- bind(keys, args) and runs the body. A function may not set globals, so every
-- name below is a local of the chunk, assigned per call (calls are atomic: no two
-- run at once).
local KEYS, ARGV
local WINDOW, META, LOG, IDEM, ARCHIVE, REACTIONS, DEFERRED, CURSORS
local C_EPOCH, C_TAG, C_VERSION, C_HEAD, C_LEN
local TOKEN, TTL, DEFAULT_LIMIT, FRESH_EPOCH, TAG, ARCHIVE_TTL
local created -- keys this call may have created (see touch)
local wrote -- whether this call saved meta (see sync_reply)
-- Whether the caller runs this call in a transaction whose next command is
-- LRANGE window 0 -1 (sync.lua sets it): a snapshot then leaves its rows to that
-- LRANGE (see snapshot).
local rows_follow

local function bind(keys, args)
  unpack = global_unpack()
  KEYS, ARGV = keys, args
  WINDOW, META, LOG, IDEM, ARCHIVE = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
  REACTIONS, DEFERRED, CURSORS = KEYS[6], KEYS[7], KEYS[8]
  C_EPOCH, C_TAG = ARGV[1], ''
  local at = string.find(C_EPOCH, '/', 1, true)
  if at then
    C_EPOCH, C_TAG = string.sub(ARGV[1], 1, at - 1), string.sub(ARGV[1], at + 1)
  end
  C_VERSION = tonumber(ARGV[2])
  C_HEAD = tonumber(ARGV[3])
  C_LEN = tonumber(ARGV[4])
  TOKEN = ARGV[5]
  TTL = tonumber(ARGV[6])
  DEFAULT_LIMIT = tonumber(ARGV[7])
  FRESH_EPOCH = ARGV[8]
  -- The tag of the versions this call creates: fresh per call (a write sends a
  -- fresh epoch, or else a fresh idempotency token).
  TAG = string.sub(FRESH_EPOCH ~= '' and FRESH_EPOCH or TOKEN, 1, 8)
  ARCHIVE_TTL = tonumber(ARGV[9])
  created = {}
  wrote = false
  rows_follow = false
end

local TAG_RING = 64
local LOG_CAP = 256
local IDEM_CAP = 1024
-- The ZSET is trimmed by score once every IDEM_TRIM_EVERY writes, not on every
-- write: it holds between IDEM_CAP and IDEM_CAP + IDEM_TRIM_EVERY tokens.
local IDEM_TRIM_EVERY = 64
-- Not a token (tokens are hex): see remember.
local IDEM_MARK = '~'
local PUSH_CHUNK = 1000
-- See touch().
local REFRESH_FRACTION = 4

local function created_key(key)
  created[#created + 1] = key
end

local function ring_field(v)
  return 't' .. (v % TAG_RING)
end

-- Whether a caller at version v that holds tag for it saw this server's history
-- (see "Lineage tags" above); stored: the tag this server keeps for v, if read.
local function same_lineage(m, v, tag, stored)
  if m.tag == nil then
    return true -- no tags yet (an older engine's meta): nothing to check
  end
  if tag == '' or v > m.version or v <= m.version - TAG_RING then
    return false
  end
  if stored == nil then
    stored = redis.call('HGET', META, ring_field(v))
  end
  return stored == tag
end

-- m.known: the caller (ARGV[1..2]) is at a version of this room's history, as this
-- server has it: same epoch and a tag that matches (see "Lineage tags" above).
local function read_meta()
  local m = redis.call('HMGET', META, 'epoch', 'version', 'head', 'base', 'logfloor',
                       'limit', 'rebackfill', 'iseq', 'logn', 'tag', ring_field(C_VERSION))
  if not m[1] then
    return nil
  end
  local meta = {
    epoch = m[1],
    version = tonumber(m[2]) or 0,
    head = tonumber(m[3]) or 0,
    base = tonumber(m[4]) or 0,
    logfloor = tonumber(m[5]) or 0,
    limit = tonumber(m[6]) or 0,
    rebackfill = tonumber(m[7]) or 0,
    iseq = tonumber(m[8]), -- nil: not counted yet (see remember)
    logn = tonumber(m[9]), -- nil: written by an older engine (the log is trusted)
  }
  if m[10] then
    local sep = string.find(m[10], ':', 1, true)
    if sep and tonumber(string.sub(m[10], 1, sep - 1)) == meta.version then
      meta.tag = string.sub(m[10], sep + 1) -- else nil: an older engine wrote since
    end
  end
  meta.tagged = meta.version -- the version whose tag is stored (see save)
  meta.known = C_EPOCH == meta.epoch and same_lineage(meta, C_VERSION, C_TAG, m[11] or false)
  return meta
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
  created_key(META)
  local m = {epoch = FRESH_EPOCH, version = 0, head = 0, base = 0, logfloor = 0, logn = 0,
             limit = 0, rebackfill = 0, tagged = 0,
             known = C_EPOCH == FRESH_EPOCH and C_VERSION == 0}
  if TAG == '' then
    -- A call that creates no version (defer.lua) has no tag to give version 0: the
    -- room has no tags until its first write (nothing to check until then).
    redis.call('HSET', META, 'epoch', FRESH_EPOCH, 'version', 0, 'head', 0, 'base', 0,
               'logfloor', 0, 'logn', 0)
  else
    m.tag = TAG
    redis.call('HSET', META, 'epoch', FRESH_EPOCH, 'version', 0, 'head', 0, 'base', 0,
               'logfloor', 0, 'logn', 0, 'tag', '0:' .. TAG, ring_field(0), TAG)
  end
  return m
end

-- Every redis.call costs about a microsecond of script overhead, so a write
-- changes m in Lua (bump, trim, remember) and stores version, head, logfloor,
-- logn and iseq with ONE HSET at the end (save). The script is atomic, so reading the
-- version once and writing version + 1 is the same as HINCRBY.
local function bump(m)
  m.version = m.version + 1
end

-- ...: more field/value pairs a script changed (base, limit, rebackfill).

-- freshness="push" workers subscribe to the room's notice channel (WINDOW ..
-- ':notice', named in conversation/_redis/keys.py: the room's hash tag, so its
-- slot) and trust their mirror while no notice runs ahead of it. SPUBLISH, as a
-- Cluster shards it by slot; one server and fakeredis accept it as well. With no
-- subscriber it costs one dictionary lookup. pcall: an ACL user without channel
-- rights (Redis 7's acl-pubsub-default is resetchannels) must still write; its
-- own SSUBSCRIBE is refused just the same, so its push readers never vouch.
local function notify(m)
  redis.pcall('SPUBLISH', WINDOW .. ':notice', m.epoch .. ' ' .. m.version)
end

local function save(m, ...)
  wrote = true
  local fields = {'version', m.version, 'head', m.head, 'logfloor', m.logfloor}
  if m.logn then
    fields[#fields + 1] = 'logn'
    fields[#fields + 1] = m.logn
  end
  if m.iseq then
    fields[#fields + 1] = 'iseq'
    fields[#fields + 1] = m.iseq
  end
  if m.version ~= m.tagged then
    -- A new version: its tag (the versions a call skips over get none; nobody is
    -- told of them, and a caller that claims one is checked against a slot that
    -- does not hold its tag).
    m.tag, m.tagged = TAG, m.version
    fields[#fields + 1] = 'tag'
    fields[#fields + 1] = m.version .. ':' .. TAG
    fields[#fields + 1] = ring_field(m.version)
    fields[#fields + 1] = TAG
  end
  local extra = {...}
  for i = 1, #extra do
    fields[#fields + 1] = extra[i]
  end
  redis.call('HSET', META, unpack(fields))
  notify(m)
end

-- Keys that live as long as the room is written: a write refreshes their TTLs
-- together, but only once a quarter of the TTL has gone by since the last refresh
-- (meta's PTTL says when: ONE call instead of a PEXPIRE per key). So every key
-- always has at least three quarters of the TTL left after a write. A key that
-- this call may have created (RPUSH onto nothing, the first ZADD, HSET of a new
-- hash) has no TTL yet: the call names it in `created`, and touch() gives it one
-- whatever meta's PTTL says. The archive is refreshed with the others when its TTL
-- is the room's (the default), else on every write, as the cursors hash is by
-- cursor_set.lua. A PEXPIRE of a missing key creates nothing: a reader down
-- longer than the TTL finds its cursor as long as the room lives.
-- full: refresh every key now (the rare scripts that rewrite much of the room).
local function touch(full)
  if TTL > 0 then
    local left = full and -1 or redis.call('PTTL', META)
    if left < TTL - TTL / REFRESH_FRACTION or left > TTL then
      redis.call('PEXPIRE', WINDOW, TTL)
      redis.call('PEXPIRE', META, TTL)
      redis.call('PEXPIRE', LOG, TTL)
      redis.call('PEXPIRE', IDEM, TTL)
      redis.call('PEXPIRE', REACTIONS, TTL)
      redis.call('PEXPIRE', CURSORS, TTL)
      if ARCHIVE_TTL == TTL then
        redis.call('PEXPIRE', ARCHIVE, TTL)
      end
    else
      for i = 1, #created do
        redis.call('PEXPIRE', created[i], TTL)
      end
    end
  end
  if ARCHIVE_TTL > 0 and ARCHIVE_TTL ~= TTL then
    redis.call('PEXPIRE', ARCHIVE, ARCHIVE_TTL)
  end
end

-- The log and logn start again (clear, rewrite, fold): base = version already
-- sends every older caller a snapshot.
local function reset_log(m)
  redis.call('DEL', LOG)
  m.logfloor = 0
  m.logn = 0
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
-- tokens: the tokens of the writes this call applied (nil: this call's TOKEN).
local function remember(m, tokens)
  if tokens == nil then
    if TOKEN == '' then
      return
    end
    tokens = {TOKEN}
  end
  if #tokens == 0 then
    return
  end
  local seq = m.iseq
  if not seq then
    local last = redis.call('ZRANGE', IDEM, -1, -1, 'WITHSCORES')
    seq = math.max(tonumber(last[2]) or 0, 0)
  end
  local before = seq
  -- IDEM_MARK (score -1, below every token) tells whether the ZSET was created
  -- by this ZADD: then it is one more element added, and the key needs its TTL.
  local pairs_ = {-1, IDEM_MARK}
  for i = 1, #tokens do
    seq = seq + 1
    pairs_[2 * i + 1] = seq
    pairs_[2 * i + 2] = tokens[i]
  end
  m.iseq = seq
  if redis.call('ZADD', IDEM, unpack(pairs_)) > #tokens then
    created_key(IDEM)
  end
  if math.floor(seq / IDEM_TRIM_EVERY) > math.floor(before / IDEM_TRIM_EVERY) then
    -- Scores are consecutive, so this keeps exactly the newest IDEM_CAP tokens
    -- (and the mark, below 0).
    redis.call('ZREMRANGEBYSCORE', IDEM, 0, seq - IDEM_CAP)
  end
end

-- Returns the window's length after the push (RPUSH's reply): callers need it
-- and an LLEN would be one more call.
local function push_rows(first, last)
  local len = 0
  for i = first, last, PUSH_CHUNK do
    local upto = math.min(i + PUSH_CHUNK - 1, last)
    len = redis.call('RPUSH', WINDOW, unpack(ARGV, i, upto))
    if len == upto - i + 1 then
      created_key(WINDOW)
    end
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
  -- An append drops a row or two: one LRANGE reads the head row and the first
  -- rows that would be kept (a LINDEX each would be two calls or more). A big
  -- drop (a lower limit) reads them one by one, never the rows that go.
  local head_rows = {}
  if drop <= 2 then
    head_rows = redis.call('LRANGE', WINDOW, 0, drop + 1)
  end
  local first = head_rows[1] or redis.call('LINDEX', WINDOW, 0)
  local keep_summary = limit > 1 and is_summary(first)
  local next_kept = drop
  if keep_summary then
    next_kept = drop + 1
  end
  local function row_at(i)
    return head_rows[i + 1] or redis.call('LINDEX', WINDOW, i)
  end
  while next_kept < len and is_tool(row_at(next_kept)) do
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

-- How many records an intact log holds (nil: an older engine's meta, trusted).
-- The distinct positions of the `:log` records newer than `since`, newest first.
-- `records` is a tail of the log, oldest first, long enough to reach `since`.
local function log_positions_since(records, since)
  local positions = {}
  local seen = {}
  for i = #records, 1, -1 do
    local record = records[i]
    local sep = string.find(record, ':', 1, true)
    if tonumber(string.sub(record, 1, sep - 1)) <= since then
      break
    end
    local pos = tonumber(string.sub(record, sep + 1))
    if not seen[pos] then
      seen[pos] = true
      positions[#positions + 1] = pos
    end
  end
  return positions
end

local function log_expected(m)
  if m.logn == nil then
    return nil
  end
  return math.min(m.logn, LOG_CAP)
end

-- Sets m.logfloor when records fall off, and m.logn; save(m) stores both.
log_replace = function(m, pos)
  local record = m.version .. ':' .. pos
  local n = redis.call('RPUSH', LOG, record)
  if n == 1 then
    created_key(LOG)
  end
  local expected = log_expected(m) or (n - 1)
  if n - 1 ~= expected then
    -- The log lost records on its own (evicted, deleted): start it again from
    -- this record. Callers older than it cannot be patched any more.
    redis.call('DEL', LOG)
    redis.call('RPUSH', LOG, record)
    created_key(LOG)
    m.logn = 1
    m.logfloor = math.max(m.logfloor, m.version - 1)
    return
  end
  m.logn = expected + 1
  if n > LOG_CAP then
    local dropped = redis.call('LPOP', LOG, n - LOG_CAP)
    local last = dropped[#dropped]
    m.logfloor = tonumber(string.sub(last, 1, string.find(last, ':', 1, true) - 1))
  end
end

-- With rows_follow the reply is the header alone, kind 3: the LRANGE queued
-- right after this call in the same MULTI reads the rows, from the same state
-- (nothing runs between the two). Copying every row into Lua strings and back
-- costs the server several times what the LRANGE does (a window of images: tens
-- of milliseconds against a few), and blocks every other client meanwhile.
local function snapshot(status, m)
  if rows_follow then
    return {status, 3, m.epoch, m.version, m.tag or '', m.head, m.limit, m.rebackfill}
  end
  local reply = {status, 2, m.epoch, m.version, m.tag or '', m.head, m.limit, m.rebackfill}
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
      return {status, 0, 0, ''}
    end
    return snapshot(status, {epoch = '', version = 0, head = 0, limit = 0, rebackfill = 0})
  end
  local len = redis.call('LLEN', WINDOW)
  local caller_end = C_HEAD + C_LEN
  if not m.known or C_VERSION > m.version or C_VERSION < m.base
      or C_VERSION < m.logfloor or C_HEAD > m.head or caller_end > m.head + len then
    return snapshot(status, m)
  end
  if C_VERSION == m.version then
    return {status, 0, m.version, m.tag or ''}
  end
  local expected = log_expected(m)
  if expected and redis.call('LLEN', LOG) ~= expected then
    -- Records this caller may need are gone: patching from what is left would
    -- serve an edit's old text as current. A write heals the log, so later
    -- callers are patched again (everyone older than now gets this snapshot).
    if wrote then
      redis.call('DEL', LOG)
      redis.call('HSET', META, 'logn', 0, 'logfloor', m.version)
    end
    return snapshot(status, m)
  end
  local tail_start = math.max(caller_end, m.head)
  local reply = {status, 1, m.version, m.tag or '', m.head, m.limit, m.rebackfill, own_k, 0}
  -- Each version logs at most one record, so the records newer than the caller
  -- are among the last (version - caller version): read only those.
  local records = redis.call('LRANGE', LOG, C_VERSION - m.version, -1)
  local n = 0
  for _, pos in ipairs(log_positions_since(records, C_VERSION)) do
    if pos >= m.head and pos < tail_start and pos ~= own_pos then
      reply[#reply + 1] = pos
      reply[#reply + 1] = redis.call('LINDEX', WINDOW, pos - m.head)
      n = n + 1
    end
  end
  reply[9] = n
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
  return {status, 1, m.version, m.tag or '', m.head, m.limit, m.rebackfill, own_k, 0}
end

-- ------------------------------------------------------------------ consolidation

-- Whether the first n rows of the window are still exactly the rows they were at
-- version v, when a fold was planned on them at (epoch, head): same epoch and head,
-- no non-incremental change since v (base), and no row among them replaced since v
-- according to a log known to hold every record newer than v. This is the test that
-- lets sync_reply patch a caller at v from the log, so it trusts the log as far as
-- sync does, and it costs O(log records newer than v), never O(bytes of the rows).
-- planned: the plan's epoch, then '/' and the tag of v (as ARGV[1] carries them).
local function prefix_unchanged(m, planned, head, v, n)
  local at = string.find(planned, '/', 1, true)
  local epoch, tag = planned, ''
  if at then
    epoch, tag = string.sub(planned, 1, at - 1), string.sub(planned, at + 1)
  end
  if not m or m.epoch ~= epoch or m.head ~= head or v > m.version or v < m.base
      or v < m.logfloor or not same_lineage(m, v, tag) then
    return false
  end
  if redis.call('LLEN', WINDOW) < n then
    return false
  end
  if v == m.version then
    return true
  end
  local expected = log_expected(m)
  if expected and redis.call('LLEN', LOG) ~= expected then
    return false
  end
  -- Each version logs at most one record: those newer than v are among the last.
  local records = redis.call('LRANGE', LOG, v - m.version, -1)
  for i = #records, 1, -1 do
    local record = records[i]
    local sep = string.find(record, ':', 1, true)
    if tonumber(string.sub(record, 1, sep - 1)) <= v then
      break
    end
    if tonumber(string.sub(record, sep + 1)) < head + n then
      return false
    end
  end
  return true
end

-- A cheap fingerprint of a row: its length and first bytes (identity and role come
-- first in every row). The log already vouches for content; this catches a window
-- that is not the one the caller mirrors at all. Must match _store.py's probe().
local PROBE_BYTES = 256
local function probe(row)
  if not row then
    return ''
  end
  return #row .. ':' .. string.sub(row, 1, PROBE_BYTES)
end

-- The archive (KEYS[5]) is a LIST. Element 0 is a header:
--   "~a2|dropped|committed|bytes|folds|stage|staged|staged_bytes|ledger"
-- then the committed folds, oldest first, each as its archived rows (one element per
-- row, exactly as the window held it) followed by its commit record (a small JSON
-- object with "seq" and no "role" that says how many rows precede it); then the rows
-- staged so far by the fold in progress, if any.
--   dropped       elements ever dropped from the front (a reader sees positions shift)
--   committed     elements of the committed folds (they are elements 1..committed)
--   bytes, folds  their bytes and their count
--   stage         id of the fold whose rows follow ('' none); staged, staged_bytes:
--                 how many rows it pushed so far, and their bytes
--   ledger        "<elements>:<bytes>" per committed fold, oldest first, comma-separated
-- A reader takes only elements 1..committed: rows staged by a fold that has not
-- committed (or never will) are never part of a complete fold. Every element is
-- bounded by the size of a row, and no script call copies more than about a
-- megabyte of rows (the caller splits a big fold into calls).
-- An archive without a header holds records of the previous engine (each one whole
-- fold with its turns inline, of unknown size: they count towards the cap in folds,
-- not in bytes).
local ARCHIVE_MAGIC = '~a2|'

local function whole_folds(count)
  if count <= 0 then
    return ''
  end
  return '1:0' .. string.rep(',1:0', count - 1)
end

local function archive_read()
  local len = redis.call('LLEN', ARCHIVE)
  if len > 0 then
    local first = redis.call('LINDEX', ARCHIVE, 0)
    if string.sub(first, 1, #ARCHIVE_MAGIC) == ARCHIVE_MAGIC then
      local d, c, b, f, sid, s, sb, ledger = string.match(first,
          '^~a2|(%d+)|(%d+)|(%d+)|(%d+)|([^|]*)|(%d+)|(%d+)|(.*)$')
      if d then
        local h = {present = true, len = len, dropped = tonumber(d), committed = tonumber(c),
                   bytes = tonumber(b), folds = tonumber(f), stage = sid, staged = tonumber(s),
                   staged_bytes = tonumber(sb), ledger = ledger}
        local extra = len - 1 - h.committed - h.staged
        if extra > 0 then
          -- Records no script here accounted for (an older engine's fold, pushed
          -- after ours): they are folds, adopted whole, of unknown size, with any
          -- parts staged before them (that fold can no longer commit).
          local adopt = h.staged + extra
          h.ledger = h.ledger .. (h.ledger == '' and '' or ',') .. whole_folds(adopt)
          h.committed = h.committed + adopt
          h.folds = h.folds + adopt
          h.stage, h.staged, h.staged_bytes = '', 0, 0
        elseif extra < 0 then
          -- Records are missing (the archive was trimmed behind our back): what is
          -- left counts as whole folds of unknown size.
          h.committed, h.folds, h.bytes, h.ledger = len - 1, len - 1, 0, whole_folds(len - 1)
          h.stage, h.staged, h.staged_bytes = '', 0, 0
        end
        return h
      end
    end
  end
  return {present = false, len = len, dropped = 0, committed = len, bytes = 0, folds = len,
          stage = '', staged = 0, staged_bytes = 0, ledger = whole_folds(len)}
end

-- Stores h as element 0 (the list holds everything else already).
local function archive_write(h)
  local text = ARCHIVE_MAGIC .. h.dropped .. '|' .. h.committed .. '|' .. h.bytes .. '|'
      .. h.folds .. '|' .. h.stage .. '|' .. h.staged .. '|' .. h.staged_bytes .. '|'
      .. h.ledger
  if h.present then
    redis.call('LSET', ARCHIVE, 0, text)
  else
    redis.call('LPUSH', ARCHIVE, text)
    h.present = true
  end
end

-- Drops whatever follows the committed folds: the rows of a fold that will never
-- commit (refused, abandoned by a crashed worker, or taken over). O(rows dropped).
local function archive_discard_staged(h)
  local base = h.present and 1 or 0
  if h.len > base + h.committed then
    redis.call('LTRIM', ARCHIVE, 0, base + h.committed - 1)
    h.len = base + h.committed
  end
  h.stage, h.staged, h.staged_bytes = '', 0, 0
end

-- Whether ARGV[from..] holds 0-based inclusive index ranges (pairs) within the first
-- n rows of the window, with expect rows in all.
local function archive_ranges_ok(from, n, expect)
  local total = 0
  for i = from, #ARGV, 2 do
    local first, last = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
    if not first or not last or first < 0 or last < first or last >= n then
      return false
    end
    total = total + last - first + 1
  end
  return total == expect
end

-- Pushes to the archive the window rows of those ranges, in order (check them with
-- archive_ranges_ok first); returns how many rows and bytes. Each row is its own
-- element, so no row is ever copied into a bigger string.
local function archive_push_rows(from)
  local count, bytes = 0, 0
  for i = from, #ARGV, 2 do
    local first, last = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
    for start = first, last, PUSH_CHUNK do
      local rows = redis.call('LRANGE', WINDOW, start, math.min(start + PUSH_CHUNK - 1, last))
      for j = 1, #rows do
        bytes = bytes + #rows[j]
      end
      count = count + #rows
      redis.call('RPUSH', ARCHIVE, unpack(rows))
    end
  end
  return count, bytes
end

-- ---------------------------------------------------------------- deferred events

-- The deferred hash (KEYS[7]) maps the JSON of a message identity, exactly as a row
-- starts with it ('"42"' in '{"message_id":"42","role":...'), to that message's
-- events in arrival order, one per line: "<expiry, ms since the epoch> <event>",
-- each event an orjson object (orjson never writes a raw newline). The hash expires
-- with its newest event; each event also carries its own expiry, checked against
-- the caller's clock.

-- The identity of a row as the deferred hash names it, or nil (no identity).
local function identity_field(row)
  if string.sub(row, 1, 14) ~= '{"message_id":' then
    return nil
  end
  -- Inside the JSON string of the identity every quote is escaped, so the first
  -- ',"role":"' ends it.
  local at = string.find(row, ',"role":"', 15, true)
  if not at then
    return nil
  end
  local field = string.sub(row, 15, at - 1)
  if field == 'null' then
    return nil
  end
  return field
end

-- The unexpired events of field (value: what the hash holds), stored back without
-- the expired ones; nil when none is left (the field is dropped).
local function deferred_live(field, value, now)
  local kept = {}
  for line in string.gmatch(value, '[^\n]+') do
    local sp = string.find(line, ' ', 1, true)
    if sp and (tonumber(string.sub(line, 1, sp - 1)) or 0) > now then
      kept[#kept + 1] = line
    end
  end
  if #kept == 0 then
    redis.call('HDEL', DEFERRED, field)
    return nil
  end
  local live = table.concat(kept, '\n')
  if live ~= value then
    redis.call('HSET', DEFERRED, field, live)
  end
  return live, #kept
end

-- For append.lua: whether the rows of ARGV ranges (pairs {first, last}) may be
-- pushed now. ARGV[at]: the caller's clock (ms); ARGV[at + 1]: c, how many
-- messages' events the caller applied to its rows; then per message its field, the
-- events as it saw them, its identity and its reaction state to store ('' none,
-- '-' forget the tracked reactions: a deferred patch_reactions came last).
-- Returns nil when they may (the consumed events are dropped, the reaction states
-- stored; m: the room's meta), else the reply that hands the caller every pending event of its rows:
-- {'D', field_1, events_1, ...}. Nothing is pushed then; the caller applies them
-- and calls again.
local function deferred_ready(m, ranges, at)
  local now = tonumber(ARGV[at])
  local consumed = {}
  for i = at + 2, at + 1 + 4 * tonumber(ARGV[at + 1]), 4 do
    consumed[ARGV[i]] = {ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]}
  end
  if redis.call('EXISTS', DEFERRED) == 0 then
    if next(consumed) == nil then
      return nil
    end
    return {'D'} -- what the caller applied expired meanwhile
  end
  local fields, seen = {}, {}
  for r = 1, #ranges do
    for i = ranges[r][1], ranges[r][2] do
      local field = identity_field(ARGV[i])
      if field and not seen[field] then
        seen[field] = true
        fields[#fields + 1] = field
      end
    end
  end
  if #fields == 0 then
    return nil
  end
  local values = redis.call('HMGET', DEFERRED, unpack(fields))
  local pending = {'D'}
  local stale = false
  for i = 1, #fields do
    local live = values[i] and deferred_live(fields[i], values[i], now)
    local applied = consumed[fields[i]]
    if live and (not applied or applied[1] ~= live) then
      stale = true
    elseif applied and not live then
      stale = true -- what the caller applied expired meanwhile: it must not stand
    end
    if live then
      pending[#pending + 1] = fields[i]
      pending[#pending + 1] = live
    end
  end
  for field in pairs(consumed) do
    if not seen[field] then
      stale = true
    end
  end
  if stale then
    return pending
  end
  for field, applied in pairs(consumed) do
    redis.call('HDEL', DEFERRED, field)
    if applied[3] == '-' then
      redis.call('HDEL', REACTIONS, applied[2])
    elseif applied[3] ~= '' then
      redis.call('HSET', REACTIONS, applied[2], m.version .. '|' .. applied[3])
      created_key(REACTIONS)
    end
  end
  return nil
end
