-- Record a session's summary and facets with its remaining TTL (none when it has none) (needs forget.lua).
--
-- KEYS: none.
-- ARGV: timestamp, summary, facets.
-- Returns 1, or 0 if the session is gone.
--
-- Names in braces are constants of stores/redis.py (key prefixes, limits), filled in when it loads this file.

local key = '{SESSION}' .. ARGV[1]
local left = redis.call('PTTL', key)
if left == -2 then return 0 end
if left > 0 then
  redis.call('SET', '{META}' .. ARGV[1], ARGV[2], 'PX', left)
else
  redis.call('SET', '{META}' .. ARGV[1], ARGV[2])
end
facet(key, ARGV[1], ARGV[3])
return 1
