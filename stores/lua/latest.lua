-- The newest session's timestamp (needs forget.lua, prune.lua).
--
-- KEYS: index, expiry, pinned.
-- ARGV: now (ms).
-- Returns the timestamp, or false when there is none. Members whose key is gone without an expiry entry (written
--   by another tool, then deleted) are forgotten on the way, at most `FORGET_BATCH` of them: then 0, and the
--   caller asks again.
--
-- The body is fetched with a plain MGET after it: a 1 MB value returned through Lua costs Redis 2.5 ms of
-- copying (measured, docs/benchmarks.md), a GET 0.3 ms.
--
-- Names in braces are constants of stores/redis.py (key prefixes, limits), filled in when it loads this file.

prune(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]))
for _ = 1, {FORGET_BATCH} do
  local top = redis.call('ZREVRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #top == 0 then return false end
  if redis.call('EXISTS', top[1]) == 1 then return top[2] end
  forget(KEYS[1], KEYS[2], KEYS[3], top[1])
end
return 0
