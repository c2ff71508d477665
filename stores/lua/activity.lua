-- A library, prepended to the scripts that record activity (stores/redis.py composes them): the user's activity
-- log is a sorted set of events by time (`{ACTIVITY}`), each the event's JSON (docs/contract.md §6).
--
-- `record(ev, timestamp)` adds an event in the same step as the change it records: `ev` is the table `event(n)`
-- read from ARGV[n..n+4] (the JSON before the session's timestamp, the JSON after it, when (ms), how long the
-- log keeps events (ms), how many it keeps at most); an empty head records nothing (no event was asked for).
-- Then the log drops what is older than it keeps, and its oldest events beyond the most it keeps.
--
-- Names in braces are constants of stores/redis.py (key prefixes, limits), filled in when it loads this file.

local function event(n)
  return {head = ARGV[n], tail = ARGV[n + 1], at = tonumber(ARGV[n + 2]), keep = tonumber(ARGV[n + 3]),
          most = tonumber(ARGV[n + 4])}
end

local function record(ev, timestamp)
  if ev.head == nil or ev.head == '' then return end
  redis.call('ZADD', '{ACTIVITY}', ev.at, ev.head .. timestamp .. ev.tail)
  redis.call('ZREMRANGEBYSCORE', '{ACTIVITY}', '-inf', '(' .. string.format('%d', ev.at - ev.keep))
  local over = redis.call('ZCARD', '{ACTIVITY}') - ev.most
  if over > 0 then redis.call('ZREMRANGEBYRANK', '{ACTIVITY}', 0, over - 1) end
end
