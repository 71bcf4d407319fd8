-- archive_stage: copy some of a fold's rows from the window to the archive, before the
-- fold itself (fold.lua) commits them. A big fold's rows go to the archive in calls
-- of about a megabyte of rows each, so no call holds the server for long; they are
-- read from the window here, so they never travel to the client and back.
-- KEYS and common ARGV: see _lib.lua (the caller's window is not used).
-- ARGV[10]: epoch the fold was planned on; ARGV[11]: its head; ARGV[12]: its version;
-- ARGV[13]: n, how many head rows it folds; ARGV[14]: the fold's id; ARGV[15]: how
-- many of its rows earlier calls staged; ARGV[16]: how many rows this call stages;
-- ARGV[17..]: 0-based inclusive index ranges (pairs) of those rows in the window.
-- Returns 1 staged (or already staged by an earlier send of the same call), 0 refused:
-- the folded rows changed since the plan, or another fold took over the staging (a
-- room stages one fold at a time; the first call of a new fold discards the rows of
-- the one before it, which can no longer commit).
-- Invariant: only elements after the committed folds are written, and the header's
-- staged count always matches the rows that follow them.
local m = read_meta()
local n = tonumber(ARGV[13])
if not prefix_unchanged(m, ARGV[10], tonumber(ARGV[11]), tonumber(ARGV[12]), n) then
  return 0
end
local id, before, count = ARGV[14], tonumber(ARGV[15]), tonumber(ARGV[16])
if count < 1 or not archive_ranges_ok(17, n, count) then
  return redis.error_reply('archive_stage: ranges outside the fold or not matching the count')
end
local h = archive_read()
if h.stage == id and h.staged == before + count then
  return 1
end
if before == 0 and h.stage ~= id then
  archive_discard_staged(h)
  h.stage = id
elseif h.stage ~= id or h.staged ~= before then
  return 0
end
local pushed, bytes = archive_push_rows(17)
h.staged = h.staged + pushed
h.staged_bytes = h.staged_bytes + bytes
archive_write(h)
-- Rows of a fold that never commits must not outlive the room: they expire with
-- the archive (and the next fold's first call discards them).
if ARCHIVE_TTL > 0 then
  redis.call('PEXPIRE', ARCHIVE, ARCHIVE_TTL)
end
return 1
