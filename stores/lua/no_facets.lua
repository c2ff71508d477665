-- An indexed record with no facets to record (needs forget.lua), so that `_complete_facets` (stores/redis.py)
-- does not meet it again: one that is gone leaves every structure; one that is not a session gets empty facets,
-- which no filter matches (they are recorded anew when it is read as a session). Either loses any summary left
-- from when it was a session. Run only under WATCH of the key (`RedisStore._record`): a session saved meanwhile
-- keeps what its save recorded.
--
-- KEYS: index, expiry, pinned.
-- ARGV: timestamp.
-- Returns 0.
--
-- Names in braces are constants of stores/redis.py (key prefixes, limits), filled in when it loads this file.

local key = '{SESSION}' .. ARGV[1]
redis.call('DEL', '{META}' .. ARGV[1])
if redis.call('EXISTS', key) == 0 then
  forget(KEYS[1], KEYS[2], KEYS[3], key)
else
  facet(key, ARGV[1], '["","",""]')
end
return 0
