-- import: replace a room by an exported one, in one step, under a new epoch.
-- KEYS and common ARGV: see _lib.lua (ARGV[8], the fresh epoch, is the imported
-- room's epoch). ARGV[10]: '1' to replace a room that holds entries, else '0';
-- ARGV[11]: the head (absolute position of the first row); ARGV[12]: the window
-- limit (0 = default); ARGV[13]: the re-backfill flag ('1'/'0'); ARGV[14]: n, how
-- many rows; ARGV[15]: '1' if an archive follows (it then replaces the room's),
-- else '0' (the room's archive is kept, or dropped when replacing); ARGV[16]: the
-- archive header (see "The archive" in _lib.lua); ARGV[17]: r, how many messages'
-- tracked reactions follow; ARGV[18]: d, how many messages' deferred events follow;
-- ARGV[19]: how long the deferred hash lives (ms, the longest lifetime among them);
-- ARGV[20 .. 19 + n]: the rows; ARGV[20 + n]: k, how many idempotency tokens; the k
-- tokens (the writes the exported room had applied, oldest first); then r pairs
-- (message identity, its reactions as a JSON list, stored as react.lua stores them
-- under the new version); then d pairs (deferred field, its lines
-- "<expiry ms> <event>", as defer.lua stores them); then the archive elements,
-- oldest first. The caller checked every one of them
-- (conversation/_transfer/extensions.py): nothing here can fail half way.
-- Reply: {0, entries} refused (the room holds that many entries and ARGV[10] is not
-- '1'; nothing was written), or {1, version} imported.
-- Invariant: all or nothing; the version still grows (one past the room's last, so
-- it never goes backwards) and the epoch is new, so every worker, whatever it held,
-- reloads; the log starts empty and every change reader gets a reset; a write
-- retried under a token the export carries is a replay here too (lands once).
local held = redis.call('LLEN', WINDOW)
if ARGV[10] ~= '1' and held > 0 then
  return {0, held}
end
local old = tonumber(redis.call('HGET', META, 'version')) or 0
local n = tonumber(ARGV[14])
-- Tracked reactions and waiting events belong to the rows being replaced: the
-- export's own, if any, are written below.
redis.call('DEL', WINDOW, LOG, META, REACTIONS, DEFERRED)
local r, d = tonumber(ARGV[17]), tonumber(ARGV[18])
if ARGV[15] == '1' or ARGV[10] == '1' then
  redis.call('DEL', ARCHIVE)
end
local len = 0
if n > 0 then
  len = push_rows(20, 19 + n)
end
local m = {epoch = FRESH_EPOCH, version = old + 1, head = tonumber(ARGV[11]), base = old + 1,
           logfloor = 0, logn = 0, limit = tonumber(ARGV[12]),
           rebackfill = tonumber(ARGV[13]), iseq = nil}
trim(m, len)
local k = tonumber(ARGV[20 + n])
if k > 0 then
  remember(m, {unpack(ARGV, 21 + n, 20 + n + k)})
end
redis.call('HSET', META, 'epoch', FRESH_EPOCH)
save(m, 'base', m.base, 'rbase', m.base, 'limit', m.limit, 'rebackfill', m.rebackfill)
-- Pairs at ARGV[first ..], written PUSH_CHUNK fields at a time (unpack's stack).
local function hset_pairs(key, first, pairs, prefix)
  for i = first, first + 2 * pairs - 1, 2 * PUSH_CHUNK do
    local args = {}
    for j = i, math.min(i + 2 * PUSH_CHUNK, first + 2 * pairs) - 1, 2 do
      args[#args + 1] = ARGV[j]
      args[#args + 1] = prefix .. ARGV[j + 1]
    end
    redis.call('HSET', key, unpack(args))
  end
end
local at = 21 + n + k
if r > 0 then
  hset_pairs(REACTIONS, at, r, m.version .. '|')
end
at = at + 2 * r
if d > 0 then
  hset_pairs(DEFERRED, at, d, '')
  redis.call('PEXPIRE', DEFERRED, tonumber(ARGV[19]))
end
at = at + 2 * d
if ARGV[15] == '1' then
  local first = at
  for i = first, #ARGV, PUSH_CHUNK do
    redis.call('RPUSH', ARCHIVE, unpack(ARGV, i, math.min(i + PUSH_CHUNK - 1, #ARGV)))
  end
  if ARGV[16] ~= '' then
    redis.call('LPUSH', ARCHIVE, ARGV[16])
  end
end
touch(true)
return {1, m.version}
