-- sync: bring a caller up to date in one round trip.
-- KEYS, common ARGV and reply: see _lib.lua. ARGV[5]: the idempotency token of
-- the caller's unconfirmed (possibly timed-out) write, or ''.
-- Status: 2 if that token was already applied (the write landed), else 0.
-- Read-only: never creates, refreshes or changes a key.
local m = read_meta()
local status = 0
if m and seen() then
  status = 2
end
return sync_reply(status, m, 0, -1)
