-- sync: bring a caller up to date in one round trip.
-- KEYS: window, meta, log, idem (the only keys it reads). Common ARGV and reply:
-- see _lib.lua. ARGV[10]: 'r' when the caller sends this call as MULTI, this,
-- LRANGE window 0 -1, EXEC (a snapshot is then the header alone, kind 3: see
-- snapshot in _lib.lua), else ''. ARGV[11..]: the idempotency tokens of the
-- caller's unconfirmed (possibly timed-out) writes, none if it has none.
-- Status: with tokens, one character per token, "2" if it was already applied
-- (that write landed) else "1"; without tokens, 0.
-- Read-only: never creates, refreshes or changes a key.
local m = read_meta()
local status = 0
rows_follow = ARGV[10] == 'r'
-- The tokens are looked up even when the meta is gone: the idempotency set may
-- outlive it, and a write it names did land.
if #ARGV >= 11 then
  local scores = redis.call('ZMSCORE', IDEM, unpack(ARGV, 11, #ARGV))
  local flags = {}
  for i = 1, #scores do
    flags[i] = scores[i] and '2' or '1'
  end
  status = table.concat(flags)
end
return sync_reply(status, m, 0, -1)
