-- rewrite: compare-and-set of the whole window (used by backfill).
-- KEYS, common ARGV and reply: see _lib.lua.
-- ARGV[10]: the version the caller based the new window on; ARGV[11]: n, how many
-- rows; ARGV[12 .. 11 + n]: the rows; then the deferred events the caller applied
-- to them (see deferred_ready in _lib.lua: backfilled history may bring a message
-- that events wait for).
-- Status: 1 rewritten, 0 conflict (someone wrote since; the reply brings the
-- caller up to date to merge and retry), 2 the token was already applied; or the
-- reply {'D', ...}: events wait for some of these rows (nothing changed; apply
-- them and call again).
-- Invariant: never overwrites a write the caller did not see; base = version so
-- every worker reloads; the re-backfill request is settled.
local m = ensure_meta()
if replayed() then
  return sync_reply(2, m, 0, -1)
end
if not m.known or tonumber(ARGV[10]) ~= m.version then
  return sync_reply(0, m, 0, -1)
end
local last = 11 + tonumber(ARGV[11])
local waiting = deferred_ready(m, {{12, last}}, last + 1)
if waiting then
  return waiting
end
redis.call('DEL', WINDOW)
reset_log(m)
local len = push_rows(12, last)
bump(m)
m.head = 0
m.base = m.version
m.rebackfill = 0
trim(m, len)
remember(m)
save(m, 'base', m.base, 'rbase', m.base, 'rebackfill', 0)
touch(true)
return sync_reply(1, m, 0, -1)
