-- append: push a batch of rows, trim to the limit, refresh the TTL, once per token.
-- KEYS, common ARGV and reply: see _lib.lua.
-- ARGV[9..]: the rows, oldest first.
-- Status: 1 applied, 2 the token was already applied (nothing pushed again).
-- Invariant: a batch is pushed whole or not at all, exactly once per token; the
-- window never starts with tool results whose assistant call was trimmed.
local m = ensure_meta()
if replayed() then
  return sync_reply(2, m, 0, -1)
end
local before = {epoch = m.epoch, version = m.version, head = m.head}
local pushed = #ARGV - 8
local len = push_rows(9, #ARGV)
bump(m)
local kept = len - trim(m, len)
remember(m)
save(m)
touch()
if m.summary_moved then
  kept = kept - 1 -- the head slot now holds the summary, not one of our rows
end
local own = math.min(pushed, kept)
if C_EPOCH == before.epoch and C_VERSION == before.version and C_HEAD == before.head
    and C_LEN == len - pushed and not m.summary_moved then
  return own_reply(1, m, own)
end
return sync_reply(1, m, own, -1)
