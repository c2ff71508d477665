-- Delete one session, found or not, and leave its tombstone (needs forget.lua, activity.lua): the delete's time (now, or just
-- after the copy it deletes or an earlier delete, whichever is later), kept ARGV[3] ms.
--
-- KEYS: index, expiry, pinned.
-- ARGV: timestamp, now (ms), how long the tombstone is kept (ms), the delete's event (see activity.lua:
--   ARGV[4..8]), recorded when the session existed.
-- Returns 1 if the session existed, else 0.
--
-- Names in braces are constants of stores/redis.py (key prefixes, limits), filled in when it loads this file.

local key, tomb = '{SESSION}' .. ARGV[1], '{DELETED}' .. ARGV[1]
local dead = math.max(tonumber(ARGV[2]), tonumber(redis.call('HGET', '{ACKED}', ARGV[1]) or '-1') + 1,
                      tonumber(redis.call('GET', tomb) or '-1'))
local existed = redis.call('DEL', key)
redis.call('DEL', '{META}' .. ARGV[1])
forget(KEYS[1], KEYS[2], KEYS[3], key)
redis.call('SET', tomb, string.format('%d', dead), 'PX', ARGV[3])
if existed == 1 then record(event(4), ARGV[1]) end
return existed
