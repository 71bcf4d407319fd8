-- set_limit: change the room's window limit and/or its re-backfill flag.
-- KEYS, common ARGV and reply: see _lib.lua.
-- ARGV[10]: new limit (0 = leave it); ARGV[11]: '1' request re-backfill, '0'
-- discard the request, '' leave it.
-- Status: 1 applied, 2 the token was already applied.
-- Invariant: raising the limit flags the room for re-backfill; lowering it trims
-- at once (never orphaning tool results).
local m = ensure_meta()
if replayed() then
  return sync_reply(2, m, 0, -1)
end
local limit = tonumber(ARGV[10])
if limit > 0 then
  local current = m.limit
  if current <= 0 then
    current = DEFAULT_LIMIT
  end
  if limit > current then
    m.rebackfill = 1
  end
  m.limit = limit
end
if ARGV[11] ~= '' then
  m.rebackfill = tonumber(ARGV[11])
end
bump(m)
trim(m)
remember(m)
save(m, 'limit', m.limit, 'rebackfill', m.rebackfill)
touch(true)
return sync_reply(1, m, 0, -1)
