-- react: one reaction event on ONE row: update the message's reaction state and
-- re-render its [Reactions: ...] tag, together.
-- KEYS, common ARGV and reply: see _lib.lua (KEYS[6], the reactions hash).
-- ARGV[10]: absolute position of the row; ARGV[11]: the message's identity (its
-- field in the reactions hash); ARGV[12], ARGV[13]: the row as the caller holds it,
-- cut where the tag goes (the bytes before it and after it); ARGV[14]: '1' the tag
-- follows the marker (' [Reactions: s]'), '2' it opens the text ('[Reactions: s] ');
-- ARGV[15]: the largest row allowed; ARGV[16]: the action ('+' add, '-' remove,
-- 'c' clear one emoji, 'C' clear all); ARGV[17]: the emoji as events name it;
-- ARGV[18]: the emoji as the tag shows it; ARGV[19]: the user; ARGV[20]: how many
-- messages a room tracks reactions for at least (MAX_TRACKED_MESSAGES in
-- conversation/_reactions.py; it tracks twice its window limit if that is more).
-- The caller checked emoji and user (conversation/_reactions.py): the display
-- needs no JSON escaping, so it is spliced into the row as it is.
-- State: field = "<version last reacted>|" .. cjson [[emoji, display, [users...]], ...],
-- emoji in the order first seen; a message without reactions has no field.
-- Status: 1 re-rendered (the reply carries the new row: the caller could not know
-- the other workers' reactions), 3 the event was already in effect (a redelivery:
-- nothing changed), 0 conflict (the row changed other than in its tag, or moved:
-- the reply brings the caller up to date), 2 the token was already applied,
-- 4 refused (the message has as many reactions as it may), 5 refused (the row
-- would outgrow ARGV[15]); nothing changes on 0, 2, 4 and 5.
-- Invariant: the tag always renders the stored state; an event counts once per
-- (user, emoji) whoever sends it, however often.
local MAX_EMOJI_PER_MESSAGE = 64
local MAX_REACTIONS_PER_MESSAGE = 5000

local m = ensure_meta()
if replayed() then
  return sync_reply(2, m, 0, -1)
end
local pos = tonumber(ARGV[10])
local identity, before, after, form = ARGV[11], ARGV[12], ARGV[13], ARGV[14]
local max_bytes = tonumber(ARGV[15])
local action, key, display, user = ARGV[16], ARGV[17], ARGV[18], ARGV[19]
local window_limit = m.limit > 0 and m.limit or DEFAULT_LIMIT
local tracked = math.max(tonumber(ARGV[20]), 2 * window_limit)

local function tag_zone_ok(zone)
  if zone == '' then
    return true
  end
  if form == '1' then
    return string.match(zone, '^ %[Reactions: [^%[%]\n]*%]$') ~= nil
  end
  return string.match(zone, '^%[Reactions: [^%[%]\n]*%] $') ~= nil
end

-- The row must still be the caller's row but for its reactions tag: another
-- worker's reaction only changes the tag, so it never makes this one conflict.
local current = nil
if m.known and C_VERSION >= m.base and pos >= m.head then
  current = redis.call('LINDEX', WINDOW, pos - m.head)
end
if not current or #current < #before + #after
    or string.sub(current, 1, #before) ~= before
    or string.sub(current, #current - #after + 1) ~= after
    or not tag_zone_ok(string.sub(current, #before + 1, #current - #after)) then
  return sync_reply(0, m, 0, -1)
end

local stored = redis.call('HGET', REACTIONS, identity)
local emoji = {}
if stored then
  emoji = cjson.decode(string.sub(stored, string.find(stored, '|', 1, true) + 1))
end

local function find(k)
  for i = 1, #emoji do
    if emoji[i][1] == k then
      return i
    end
  end
  return nil
end

local function has(users, u)
  for i = 1, #users do
    if users[i] == u then
      return i
    end
  end
  return nil
end

local changed = false
local index = nil
if action ~= 'C' then
  index = find(key)
end
if action == 'C' then
  changed = #emoji > 0
  emoji = {}
elseif action == 'c' then
  if index then
    table.remove(emoji, index)
    changed = true
  end
elseif action == '-' then
  local at = index and has(emoji[index][3], user)
  if at then
    table.remove(emoji[index][3], at)
    if #emoji[index][3] == 0 then
      table.remove(emoji, index)
    end
    changed = true
  end
elseif not (index and has(emoji[index][3], user)) then
  local total = 0
  for i = 1, #emoji do
    total = total + #emoji[i][3]
  end
  if total >= MAX_REACTIONS_PER_MESSAGE or (not index and #emoji >= MAX_EMOJI_PER_MESSAGE) then
    return sync_reply(4, m, 0, -1)
  end
  if index then
    table.insert(emoji[index][3], user)
  else
    emoji[#emoji + 1] = {key, display, {user}}
  end
  changed = true
end

-- A redelivered event changes nothing, but its token is remembered: a retry of it
-- after another worker's opposite event must not apply it again.
if not changed then
  remember(m)
  save(m)
  touch()
  return sync_reply(3, m, 0, -1)
end

-- Emoji by count, highest first; ties in the order first seen.
local order = {}
for i = 1, #emoji do
  order[i] = i
end
table.sort(order, function(a, b)
  local ca, cb = #emoji[a][3], #emoji[b][3]
  if ca ~= cb then
    return ca > cb
  end
  return a < b
end)
local parts = {}
for i = 1, #order do
  local e = emoji[order[i]]
  parts[i] = e[2] .. ' ' .. #e[3]
end
local summary = table.concat(parts, ', ')
local row
if summary == '' then
  row = before .. after
elseif form == '1' then
  row = before .. ' [Reactions: ' .. summary .. ']' .. after
else
  row = before .. '[Reactions: ' .. summary .. '] ' .. after
end
if #row > max_bytes then
  return sync_reply(5, m, 0, -1)
end

redis.call('LSET', WINDOW, pos - m.head, row)
bump(m)
if #emoji == 0 then
  redis.call('HDEL', REACTIONS, identity)
else
  redis.call('HSET', REACTIONS, identity, m.version .. '|' .. cjson.encode(emoji))
  -- Least recently reacted messages go once the room tracks too many (they left
  -- the window long ago: see MAX_TRACKED_MESSAGES in conversation/_reactions.py),
  -- a sixteenth more at a time, so the sort runs once per that many new messages.
  local count = redis.call('HLEN', REACTIONS)
  if count == 1 then
    created_key(REACTIONS) -- this HSET may have made the hash: it needs its TTL
  end
  if count > tracked + math.ceil(tracked / 16) then
    local all = redis.call('HGETALL', REACTIONS)
    local ages = {}
    for i = 1, #all, 2 do
      local v = all[i + 1]
      ages[#ages + 1] = {tonumber(string.sub(v, 1, string.find(v, '|', 1, true) - 1)), all[i]}
    end
    table.sort(ages, function(a, b) return a[1] < b[1] end)
    for i = 1, #ages - tracked do
      redis.call('HDEL', REACTIONS, ages[i][2])
    end
  end
end
log_replace(m, pos)
remember(m)
save(m)
touch()
return sync_reply(1, m, 0, -1)
