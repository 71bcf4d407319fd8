-- lease_renew: extend a lease, only if the caller still holds it.
-- Standalone (no _lib.lua prelude).
-- KEYS[1]: the lease key (the room's hash tag). ARGV[1]: the holder's token;
-- ARGV[2]: new time to live in ms.
-- Returns 1 renewed, 0 not held by this token (it expired, maybe taken by another).
-- Invariant: a worker never extends a lease another worker holds.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
