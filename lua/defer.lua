-- defer: keep an event (an edit, a delete, a reaction) for a message the room does
-- not hold yet; append.lua applies it, in arrival order, when the message comes.
-- KEYS, common ARGV and reply: see _lib.lua ("Deferred events": KEYS[7]).
-- ARGV[10]: the message's identity as rows start with it (its JSON); ARGV[11]: the
-- event (an orjson object); ARGV[12]: the caller's clock (ms since the epoch);
-- ARGV[13]: how long to keep it (ms); ARGV[14]: how many messages a room may keep
-- events for; ARGV[15]: how many events one message may have waiting.
-- Status: 1 kept, 0 the room changed since the caller looked (the reply brings it
-- up to date: it looks for the message again), 3 refused (the room, or that
-- message, has as many events waiting as it may; nothing is kept).
-- Invariant: an event is kept only while the room lacks its message at the
-- caller's version, the version this script sees: so an append can never slip
-- between the caller's look and the event being kept, and be missed by it.
-- Changes no row and no version.
local m = ensure_meta()
-- An event may name a room nothing was ever written to (a channel the bot never
-- recorded): the meta ensure_meta just made must expire like any room's.
if TTL > 0 and redis.call('PTTL', META) < 0 then
  redis.call('PEXPIRE', META, TTL)
end
if not m.known or C_VERSION ~= m.version then
  return sync_reply(0, m, 0, -1)
end
local field, event, now = ARGV[10], ARGV[11], tonumber(ARGV[12])
local keep, max_messages, max_events = tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15])
local value = redis.call('HGET', DEFERRED, field)
local live, count = nil, 0
if value then
  live, count = deferred_live(field, value, now)
  count = count or 0
end
if not live and redis.call('HLEN', DEFERRED) >= max_messages then
  -- Full: drop what expired (at most max_messages fields), then look again.
  local all = redis.call('HGETALL', DEFERRED)
  for i = 1, #all, 2 do
    deferred_live(all[i], all[i + 1], now)
  end
  if redis.call('HLEN', DEFERRED) >= max_messages then
    return sync_reply(3, m, 0, -1)
  end
end
if count >= max_events then
  return sync_reply(3, m, 0, -1)
end
local line = (now + keep) .. ' ' .. event
redis.call('HSET', DEFERRED, field, live and (live .. '\n' .. line) or line)
if redis.call('PTTL', DEFERRED) < keep then
  redis.call('PEXPIRE', DEFERRED, keep)
end
return sync_reply(1, m, 0, -1)
