-- sync: bring a caller up to date in one round trip.
-- KEYS, common ARGV and reply: see _lib.lua. Status is always 0.
-- Read-only: never creates, refreshes or changes a key.
return sync_reply(0, read_meta(), 0, -1)
