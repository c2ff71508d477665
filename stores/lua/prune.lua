-- A library (needs forget.lua): `prune(index, expiry, pinned, now)` forgets the index members whose session
-- expired; run by every save, latest and list page. The work is the number of sessions that expired since the
-- last run, at most `FORGET_BATCH` (the next run goes on). A key whose TTL was removed leaves the expiry set; one
-- whose TTL was extended is tracked at its new expiry.
--
-- Names in braces are constants of stores/redis.py (key prefixes, limits), filled in when it loads this file.

local function prune(index, expiry, pinned, now)
  local due = redis.call('ZRANGEBYSCORE', expiry, '-inf', now, 'LIMIT', 0, {FORGET_BATCH})
  for _, k in ipairs(due) do
    local left = redis.call('PTTL', k)
    if left == -2 then
      forget(index, expiry, pinned, k)
    elseif left == -1 then
      redis.call('ZREM', expiry, k)
    else
      redis.call('ZADD', expiry, string.format('%d', now + left), k)
    end
  end
end
