-- Forget the sessions that expired, before a filtered list reads the facets (needs forget.lua, prune.lua).
--
-- KEYS: index, expiry, pinned.
-- ARGV: now (ms).
-- Returns 1 when some indexed sessions have no facets yet (see `_complete_facets` in stores/redis.py), else 0.
--
-- Names in braces are constants of stores/redis.py (key prefixes, limits), filled in when it loads this file.

prune(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]))
if redis.call('HLEN', '{FACETS}') < redis.call('ZCARD', KEYS[1]) then return 1 end
return 0
