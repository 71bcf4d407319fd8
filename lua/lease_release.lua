-- lease_release: give up a lease, only if the caller still holds it.
-- Standalone (no _lib.lua prelude).
-- KEYS[1]: the lease key (the room's hash tag). ARGV[1]: the holder's token.
-- Returns 1 released, 0 not held by this token (expired, or taken by another).
-- Invariant: a worker never frees a lease another worker holds.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
