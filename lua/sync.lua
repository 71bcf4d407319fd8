-- sync: bring a caller up to date in one round trip.
-- KEYS, common ARGV and reply: see _lib.lua. ARGV[10..]: the idempotency tokens of
-- the caller's unconfirmed (possibly timed-out) writes, none if it has none.
-- Status: 2 if every one of those tokens was already applied (the writes landed),
-- else 0.
-- Read-only: never creates, refreshes or changes a key.
local m = read_meta()
local status = 0
if m and #ARGV >= 10 then
  status = 2
  local scores = redis.call('ZMSCORE', IDEM, unpack(ARGV, 10, #ARGV))
  for i = 1, #scores do
    if not scores[i] then
      status = 0
      break
    end
  end
end
return sync_reply(status, m, 0, -1)
