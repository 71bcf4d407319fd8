-- Shared prelude of the session scripts: each lua/session_*.lua is "this prelude +
-- its own body" (see bind() below). It is never called on its own.
--
-- KEYS (every session script; all keys of one user share the hash tag {<user_id>},
-- so a user's index and sessions live in one cluster slot):
--   [1] index     ZSET   session id -> deadline (ms, server clock) its keys expire at
--   [2] seq       STRING counter numbering the user's sessions in creation order
--   [3..]         the script's own session keys (see its header); the scripts
--                 that take one session take [3] meta, [4] messages, [5] idem,
--                 [6] state, [7] owner state
-- ARGV (every session script): [1] user id, [2] idle TTL in ms.
--
-- One session is four keys that always carry the same PEXPIREAT deadline:
--   meta      HASH   user, sid, token, seq, created, updated (ms), count
--   messages  LIST   orjson rows, oldest first; every row starts with {"role":"...
--   idem      ZSET   ids of the last IDEM_CAP appends applied (score: arrival order)
--   state     HASH   the session's state: key -> orjson value (absent when empty)
-- and the user has one more, shared by all of their sessions:
--   owner state HASH key -> orjson value; it expires TTL after the last use of
--                  any of the user's sessions (every use moves it to that deadline)
--
-- Invariants kept by every script:
--   * a session exists iff its meta hash exists and names this user and id; a
--     messages list or idem set without meta is debris (meta evicted): deleted;
--   * a live session's index score is the deadline its keys expire at, so
--     dropping members scored below now is exact TTL pruning, no SCAN needed;
--   * the index and the seq counter expire with the user's longest-lived session.
-- Times come from the server's TIME, so workers with skewed clocks agree.

-- Lua 5.1 (Redis) has unpack, 5.4 (fakeredis) table.unpack. Globals other than
-- redis are only there when a call runs (not while a function library loads), so
-- bind() takes it; this function, defined before the local, reads the global.
local function global_unpack()
  return unpack or table.unpack
end
local unpack

-- Per-call state, bound by bind() when a call starts (see bind() in _lib.lua for
-- the two forms the loader builds: EVALSHA and a Redis Function library).
local KEYS, ARGV
local INDEX, SEQ, USER, TTL, NOW
local TOOL_ROW = '{"role":"tool"'
local PUSH_CHUNK = 1000
local IDEM_CAP = 64

-- Numbers go to Redis as plain integers ("1700000000000"), never "1.7e+12".
local function int(n)
  return string.format('%d', n)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function bind(keys, args)
  unpack = global_unpack()
  -- Redis 3.2/4 need this before writing after TIME; 5+ replicate effects anyway.
  if redis.replicate_commands then
    redis.replicate_commands()
  end
  KEYS, ARGV = keys, args
  INDEX, SEQ = KEYS[1], KEYS[2]
  USER = ARGV[1]
  TTL = tonumber(ARGV[2])
  NOW = now_ms()
end

-- Drop members whose deadline passed (their keys are gone), then let the index
-- and the seq counter live exactly as long as the longest-lived session left.
local function settle_index()
  redis.call('ZREMRANGEBYSCORE', INDEX, '-inf', '(' .. int(NOW))
  local top = redis.call('ZRANGE', INDEX, -1, -1, 'WITHSCORES')
  if top[2] then
    local deadline = int(tonumber(top[2]))
    redis.call('PEXPIREAT', INDEX, deadline)
    redis.call('PEXPIREAT', SEQ, deadline)
  else
    redis.call('DEL', SEQ)
  end
end

-- The session's meta, or nil when it does not exist or is not this user's
-- (the key embeds the user id; the stored fields must say so again).
local function load_meta(meta, sid)
  local m = redis.call('HMGET', meta, 'user', 'sid', 'token', 'seq', 'created', 'updated',
                       'count')
  if not m[1] or m[1] ~= USER or m[2] ~= sid then
    return nil
  end
  return {
    token = m[3],
    seq = tonumber(m[4]) or 0,
    created = tonumber(m[5]) or 0,
    updated = tonumber(m[6]) or 0,
    count = tonumber(m[7]) or 0,
  }
end

-- s: {meta, messages, idem, state, owner_state = keys; sid = session id}, from KEYS[3..7].
local function session_keys(sid)
  return {meta = KEYS[3], messages = KEYS[4], idem = KEYS[5], state = KEYS[6],
          owner_state = KEYS[7], sid = sid}
end

-- A session without meta is gone: remove what is left of it.
local function forget(s)
  if redis.call('EXISTS', s.meta) == 0 then
    redis.call('DEL', s.messages, s.idem, s.state)
    redis.call('ZREM', INDEX, s.sid)
  end
  settle_index()
end

-- Use of a session: its keys, its index entry and the user's state move to one
-- new deadline (NOW + TTL is the latest deadline any of the user's keys has).
local function touch(s)
  local deadline = NOW + TTL
  redis.call('PEXPIREAT', s.meta, int(deadline))
  redis.call('PEXPIREAT', s.messages, int(deadline))
  redis.call('PEXPIREAT', s.idem, int(deadline))
  redis.call('PEXPIREAT', s.state, int(deadline))
  redis.call('PEXPIREAT', s.owner_state, int(deadline))
  redis.call('ZADD', INDEX, int(deadline), s.sid)
  settle_index()
  return deadline
end

-- Read a state delta from ARGV at position at: a count n, then n (key, value)
-- pairs. Returns the flat pair list and the position after it.
local function read_pairs(at)
  local n = tonumber(ARGV[at]) or 0
  local pairs_ = {}
  for i = at + 1, at + 2 * n do
    pairs_[#pairs_ + 1] = ARGV[i]
  end
  return pairs_, at + 1 + 2 * n
end

local function write_pairs(key, pairs_)
  for i = 1, #pairs_, 2 * PUSH_CHUNK do
    redis.call('HSET', key, unpack(pairs_, i, math.min(i + 2 * PUSH_CHUNK - 1, #pairs_)))
  end
end

-- Append a hash to a reply as a count and its (field, value) pairs.
local function reply_hash(reply, key)
  local flat = redis.call('HGETALL', key)
  reply[#reply + 1] = #flat / 2
  for i = 1, #flat do
    reply[#reply + 1] = flat[i]
  end
end

local function is_tool(row)
  return string.sub(row, 1, #TOOL_ROW) == TOOL_ROW
end

-- Drop the oldest rows down to cap; if anything was dropped, also drop tool
-- results left at the front without the assistant call they answer.
local function trim(messages, cap)
  local len = redis.call('LLEN', messages)
  if len <= cap then
    return 0
  end
  local drop = len - cap
  while drop < len and is_tool(redis.call('LINDEX', messages, drop)) do
    drop = drop + 1
  end
  redis.call('LTRIM', messages, drop, -1)
  return drop
end

-- Has this write id been applied? (redis-py retries a command after a
-- connection error or timeout, which may follow a run that did land.)
local function seen(s, write_id)
  return redis.call('ZSCORE', s.idem, write_id) ~= false
end

local function remember(s, write_id)
  local last = redis.call('ZRANGE', s.idem, -1, -1, 'WITHSCORES')
  local score = 1
  if last[2] then
    score = tonumber(last[2]) + 1
  end
  redis.call('ZADD', s.idem, score, write_id)
  local n = redis.call('ZCARD', s.idem)
  if n > IDEM_CAP then
    redis.call('ZREMRANGEBYRANK', s.idem, 0, n - IDEM_CAP - 1)
  end
end
