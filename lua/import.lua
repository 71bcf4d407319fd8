-- import: replace a room by an exported one, in one step, under a new epoch.
-- KEYS and common ARGV: see _lib.lua (ARGV[8], the fresh epoch, is the imported
-- room's epoch). ARGV[10]: '1' to replace a room that holds entries, else '0';
-- ARGV[11]: the head (absolute position of the first row); ARGV[12]: the window
-- limit (0 = default); ARGV[13]: the re-backfill flag ('1'/'0'); ARGV[14]: n, how
-- many rows; ARGV[15]: '1' if an archive follows (it then replaces the room's),
-- else '0' (the room's archive is kept, or dropped when replacing); ARGV[16]: the
-- archive header (see "The archive" in _lib.lua); ARGV[17 .. 16 + n]: the rows;
-- ARGV[17 + n]: k, how many idempotency tokens; the k tokens (the writes the
-- exported room had applied, oldest first); then the archive elements, oldest first.
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
-- Tracked reactions and waiting events belong to the rows being replaced.
redis.call('DEL', WINDOW, LOG, META, REACTIONS, DEFERRED)
if ARGV[15] == '1' or ARGV[10] == '1' then
  redis.call('DEL', ARCHIVE)
end
local len = 0
if n > 0 then
  len = push_rows(17, 16 + n)
end
local m = {epoch = FRESH_EPOCH, version = old + 1, head = tonumber(ARGV[11]), base = old + 1,
           logfloor = 0, logn = 0, limit = tonumber(ARGV[12]),
           rebackfill = tonumber(ARGV[13]), iseq = nil}
trim(m, len)
local k = tonumber(ARGV[17 + n])
if k > 0 then
  remember(m, {unpack(ARGV, 18 + n, 17 + n + k)})
end
redis.call('HSET', META, 'epoch', FRESH_EPOCH)
save(m, 'base', m.base, 'rbase', m.base, 'limit', m.limit, 'rebackfill', m.rebackfill)
if ARGV[15] == '1' then
  local first = 18 + n + k
  for i = first, #ARGV, PUSH_CHUNK do
    redis.call('RPUSH', ARCHIVE, unpack(ARGV, i, math.min(i + PUSH_CHUNK - 1, #ARGV)))
  end
  if ARGV[16] ~= '' then
    redis.call('LPUSH', ARCHIVE, ARGV[16])
  end
end
touch()
return {1, m.version}
