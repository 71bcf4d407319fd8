-- clear: empty the room for every worker; the version still advances.
-- KEYS, common ARGV and reply: see _lib.lua.
-- The tracked reactions and the deferred events go with the window.
-- Status: 1 cleared, 2 the token was already applied.
-- Invariant: version never goes backwards (meta, limit and idempotency survive);
-- base = version, so every other worker reloads (an empty snapshot).
local m = ensure_meta()
if replayed() then
  return sync_reply(2, m, 0, -1)
end
redis.call('DEL', WINDOW, REACTIONS, DEFERRED)
reset_log(m)
bump(m)
m.head = 0
m.base = m.version
remember(m)
save(m, 'base', m.base, 'rbase', m.base, 'clearv', m.version)
touch(true)
return sync_reply(1, m, 0, -1)
