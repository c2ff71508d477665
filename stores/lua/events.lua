-- Write back activity events a local store kept while Redis was away (needs activity.lua): adding an event
-- Redis holds already changes nothing, so a write-back cut short and sent again records each once.
--
-- ARGV: how long the log keeps events (ms), how many it keeps at most, then pairs of (when, the event's JSON).
-- Returns how many events were sent.
--
-- Names in braces are constants of stores/redis.py (key prefixes, limits), filled in when it loads this file.

for i = 3, #ARGV, 2 do
  record({head = ARGV[i + 1], tail = '', at = tonumber(ARGV[i]), keep = tonumber(ARGV[1]),
          most = tonumber(ARGV[2])}, '')
end
return (#ARGV - 2) / 2
