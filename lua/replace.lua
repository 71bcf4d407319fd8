-- replace: swap ONE row, only if it is still the row the caller based its edit on.
-- KEYS, common ARGV and reply: see _lib.lua.
-- ARGV[10]: absolute position of the row; ARGV[11]: the first 16 hex digits of the
-- SHA1 of the row the caller
-- holds there, or '=' followed by that whole row (for servers without
-- redis.sha1hex, such as fakeredis); ARGV[12]: the new row; ARGV[13]: the
-- identity whose tracked reactions (KEYS[6]) the new row supersedes, or ''
-- (patch_reactions sets the summary itself: the tracked users no longer count).
-- Status: 1 replaced, 0 conflict (the reply brings the caller up to date so it
-- can re-apply its edit and retry), 2 the token was already applied.
-- Invariant: concurrent appends never conflict (positions are absolute); an edit
-- is never applied on top of a row it did not see.
local m = ensure_meta()
if replayed() then
  return sync_reply(2, m, 0, -1)
end
local pos = tonumber(ARGV[10])
if m.known and C_VERSION >= m.base and pos >= m.head then
  local current = redis.call('LINDEX', WINDOW, pos - m.head)
  local expected = ARGV[11]
  local same
  if string.sub(expected, 1, 1) == '=' then
    same = current and current == string.sub(expected, 2)
  else
    same = current and string.sub(redis.sha1hex(current), 1, 16) == expected
  end
  if same then
    local was_current = C_VERSION == m.version and C_HEAD == m.head
    redis.call('LSET', WINDOW, pos - m.head, ARGV[12])
    if ARGV[13] and ARGV[13] ~= '' then
      redis.call('HDEL', REACTIONS, ARGV[13])
    end
    bump(m)
    log_replace(m, pos)
    remember(m)
    save(m)
    touch()
    -- A caller that was up to date is owed nothing but the new version (the
    -- LLEN check keeps sync_reply's guard against a window that lost rows).
    if was_current and C_LEN == redis.call('LLEN', WINDOW) then
      return own_reply(1, m, 0)
    end
    return sync_reply(1, m, 0, pos)
  end
end
return sync_reply(0, m, 0, -1)
