-- The timestamps of one list page, newest first within a score range (needs forget.lua, prune.lua).
--
-- KEYS: index, expiry, pinned.
-- ARGV: offset, limit, min, max, now (ms).
-- Returns {total, score1, score2, ...}. Dead members in the window are forgotten first, so a page is never
--   short while matches remain; after `PAGE_ROUNDS` windows that held some, {} (the caller asks again).
--
-- Names in braces are constants of stores/redis.py (key prefixes, limits), filled in when it loads this file.

prune(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[5]))
for _ = 1, {PAGE_ROUNDS} do
  local rows = redis.call('ZREVRANGEBYSCORE', KEYS[1], ARGV[4], ARGV[3], 'WITHSCORES', 'LIMIT', ARGV[1], ARGV[2])
  local dead = 0
  for i = 1, #rows, 2 do
    if redis.call('EXISTS', rows[i]) == 0 then
      forget(KEYS[1], KEYS[2], KEYS[3], rows[i])
      dead = dead + 1
    end
  end
  if dead == 0 then
    local out = {redis.call('ZCOUNT', KEYS[1], ARGV[3], ARGV[4])}
    for i = 2, #rows, 2 do out[#out + 1] = rows[i] end
    return out
  end
end
return {}
