-- A library: the Lua twin of `allocator.choose`, step 2 of the timestamp rule (allocator.py), for the save script.
--
-- `assign(clock, proposal, now)`, with `clock` the clock key's name, returns the chosen timestamp, and what the
-- clock key held when that was not a trusted value (else nil); nil alone when `PROBES` timestamps from the
-- start were all taken. The proposal is used unless it lags more than `SKEW_MS` behind the clock (then one
-- past the clock), and then the first millisecond from there that no session holds. The clock key keeps the
-- greatest timestamp assigned. A value is trusted (as `allocator.trusted`) if it is at most 15 digits, so exact
-- in a double, and at most `MAX_AHEAD_MS` ahead of `now`; anything else (another type included) is replaced.
--
-- Names in braces are constants of allocator.py and stores/redis.py, filled in when stores/redis.py loads this file.

local function assign(clock, proposal, now)
  local held, last, bad = redis.pcall('GET', clock), 0, nil
  if type(held) == 'string' and #held <= 15 and string.match(held, '^%d+$')
      and tonumber(held) <= now + {MAX_AHEAD_MS} then
    last = tonumber(held)
  elseif type(held) == 'string' then
    bad = string.sub(held, 1, 40)
  elseif held then
    bad = 'a ' .. redis.call('TYPE', clock)['ok']
  end
  local ts = proposal
  if ts + {SKEW_MS} < last then ts = last + 1 end
  for _ = 1, {PROBES} do
    if redis.call('EXISTS', '{SESSION}' .. string.format('%d', ts)) == 0 then
      if ts > last or bad then redis.call('SET', clock, string.format('%d', ts)) end
      return ts, bad
    end
    ts = ts + 1
  end
  return nil
end
