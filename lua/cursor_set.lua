-- cursor_set: move a named change-feed cursor, optionally only from an expected value
-- (compare-and-set), and give the room's cursors the room's TTL.
-- KEYS[1]: the room's cursors HASH ({prefix}:conversation:{<room_id>}:cursors),
--          field = cursor name, value = cursor.
-- ARGV[1]: the name; ARGV[2]: the new cursor; ARGV[3]: mode, 'any' (set it whatever
-- it holds), 'absent' (only if no cursor of that name is stored) or 'equal' (only if
-- the stored cursor is ARGV[4]); ARGV[5]: TTL in ms (0 = the hash does not expire).
-- Returns 1 when the cursor was set, 0 when the stored value did not match (another
-- worker moved it first; nothing was written).
-- Invariant: between reading the stored value and writing the new one nothing else
-- runs, so two workers that both expect the same value cannot both move it.
local name, new, mode = ARGV[1], ARGV[2], ARGV[3]
local current = redis.call('HGET', KEYS[1], name)
if mode == 'absent' then
  if current then
    return 0
  end
elseif mode == 'equal' then
  if current ~= ARGV[4] then
    return 0
  end
elseif mode ~= 'any' then
  return redis.error_reply('cursor_set: unknown mode ' .. tostring(mode))
end
redis.call('HSET', KEYS[1], name, new)
local ttl = tonumber(ARGV[5])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
