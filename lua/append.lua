-- append: push a batch of writes' rows, trim to the limit, refresh the TTL; each
-- write once per its own idempotency token.
-- KEYS, common ARGV and reply: see _lib.lua (ARGV[5] is unused: tokens come per write).
-- ARGV[10]: g, how many writes; ARGV[11 .. 10 + 2g]: per write, its token and how
-- many rows it has; then every write's rows, oldest first; then the deferred
-- events the caller applied to them (see deferred_ready in _lib.lua).
-- Status: one character per write, in order: '1' pushed now, '2' its token had
-- already applied (its rows were not pushed again); or the reply {'D', ...}: events
-- wait for some of these rows (nothing was pushed; apply them and call again).
-- Invariant: a write is pushed whole or not at all, exactly once per token, and a
-- replayed write is skipped alone (the others of the batch land); the window never
-- starts with tool results whose assistant call was trimmed.
local m = ensure_meta()
local writes = tonumber(ARGV[10])
local first_row = 11 + 2 * writes
local tokens = {}
for i = 1, writes do
  tokens[i] = ARGV[9 + 2 * i]
end
local known = redis.call('ZMSCORE', IDEM, unpack(tokens))
local flags = {}
local fresh = {}
local in_batch = {}
local replays = 0
local pushed = 0
local len
local row = first_row
local ranges = {}
for i = 1, writes do
  local token = tokens[i]
  local count = tonumber(ARGV[10 + 2 * i])
  if known[i] or in_batch[token] then
    flags[i] = '2'
    replays = replays + 1
  else
    flags[i] = '1'
    in_batch[token] = true
    fresh[#fresh + 1] = token
    if count > 0 then
      ranges[#ranges + 1] = {row, row + count - 1}
    end
  end
  row = row + count
end
-- Events that came before these messages (defer.lua) are applied to the rows by
-- the caller, which this call checks; else it hands them over and pushes nothing.
local waiting = deferred_ready(m, ranges, row)
if waiting then
  return waiting
end
for r = 1, #ranges do
  len = push_rows(ranges[r][1], ranges[r][2])
  pushed = pushed + ranges[r][2] - ranges[r][1] + 1
end
local status = table.concat(flags)
if replays > 0 then
  -- A replay still writes (a counter in meta), so a WAIT after it on any connection
  -- (min_replicas) also waits for the replication of the first attempt.
  redis.call('HINCRBY', META, 'replays', replays)
end
if #fresh == 0 then
  return sync_reply(status, m, 0, -1)
end
local before = {epoch = m.epoch, version = m.version, head = m.head}
len = len or redis.call('LLEN', WINDOW)
bump(m)
local kept = len - trim(m, len)
remember(m, fresh)
save(m)
touch()
if m.summary_moved then
  kept = kept - 1 -- the head slot now holds the summary, not one of our rows
end
local own = math.min(pushed, kept)
if m.known and C_VERSION == before.version and C_HEAD == before.head
    and C_LEN == len - pushed and not m.summary_moved then
  return own_reply(status, m, own)
end
return sync_reply(status, m, own, -1)
