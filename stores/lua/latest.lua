-- The newest session, in one round trip (needs forget.lua, prune.lua).
--
-- KEYS: index, expiry, pinned.
-- ARGV: now (ms), the largest body (bytes) returned inline.
-- Returns {timestamp, body or false, summary or false, 1 when pinned else 0}, false when there is none, or 0
--   when members whose key is gone without an expiry entry (written by another tool, then deleted) were forgotten
--   on the way, at most `FORGET_BATCH` of them: then the caller asks again. The timestamp is the member's digits,
--   never its score: a score of more than 15 digits (an old clock bug wrote 19) comes back as a float.
--
-- A body larger than ARGV[2] is not returned (false): the caller GETs it. Moving a value through Lua costs Redis
-- a copy into Lua and one out, and the garbage after: 1.75 ms of its CPU for 1 MB against 0.2 ms for a GET
-- (measured, docs/benchmarks.md); for a small body that is less than a second round trip.
--
-- Names in braces are constants of stores/redis.py (key prefixes, limits), filled in when it loads this file.

prune(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]))
for _ = 1, {FORGET_BATCH} do
  local top = redis.call('ZREVRANGE', KEYS[1], 0, 0)
  if #top == 0 then return false end
  local key = top[1]
  local size = redis.pcall('STRLEN', key)  -- an error: another tool's key of another type (never a session)
  if type(size) ~= 'number' or size > 0 or redis.call('EXISTS', key) == 1 then
    local id = string.sub(key, {ID_AT})
    local body = false
    if type(size) == 'number' and size <= (tonumber(ARGV[2]) or 0) then body = redis.call('GET', key) end
    return {id, body, redis.call('GET', '{META}' .. id), redis.call('SISMEMBER', KEYS[3], key)}
  end
  forget(KEYS[1], KEYS[2], KEYS[3], key)
end
return 0
