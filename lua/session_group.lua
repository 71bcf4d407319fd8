-- session_group: state shared by a group of session users (an app's users), and
-- the group's live members. Runs without the session prelude: it touches no
-- session, and its keys carry the group's own hash tag, not a user's.
-- KEYS: [1] group state HASH key -> orjson value, [2] members ZSET user id ->
--   deadline (ms, server clock) until which that member counts as live.
-- ARGV: [1] idle TTL ms, [2] the member using the group now ('' for none),
--   [3] '1' to return the live members, [4] n, then n (key, orjson value) pairs
--   to set.
-- Returns {n, n (key, value) pairs of the group state after the write,
--   members...} (members only when asked, soonest deadline first).
-- Invariant: every use moves both keys and the member to NOW + TTL, and members
-- whose deadline passed are dropped, so the keys live exactly as long as the
-- group is used and a member stays listed as long as any of its sessions can.
local unpack = unpack or table.unpack
local STATE, MEMBERS = KEYS[1], KEYS[2]
local TTL, MEMBER, WANT = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local n = tonumber(ARGV[4]) or 0

if redis.replicate_commands then
  redis.replicate_commands()
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = string.format('%d', now + TTL)

for i = 5, 4 + 2 * n, 2000 do
  redis.call('HSET', STATE, unpack(ARGV, i, math.min(i + 1999, 4 + 2 * n)))
end
if MEMBER ~= '' then
  redis.call('ZADD', MEMBERS, deadline, MEMBER)
end
redis.call('ZREMRANGEBYSCORE', MEMBERS, '-inf', '(' .. string.format('%d', now))
redis.call('PEXPIREAT', STATE, deadline)
redis.call('PEXPIREAT', MEMBERS, deadline)

local flat = redis.call('HGETALL', STATE)
local reply = {#flat / 2}
for i = 1, #flat do
  reply[#reply + 1] = flat[i]
end
if WANT == '1' then
  local members = redis.call('ZRANGE', MEMBERS, 0, -1)
  for i = 1, #members do
    reply[#reply + 1] = members[i]
  end
end
return reply
