-- Pin or unpin one session (needs activity.lua). Unpinning starts the TTL again from now; unpinning a session
-- that was not pinned changes nothing.
--
-- KEYS: expiry, pinned.
-- ARGV: timestamp, "1" to pin (else unpin), now (ms), TTL (ms; 0: none), the event (see activity.lua: ARGV[5..9]).
-- Returns 1 if the session exists, else 0.
--
-- Names in braces are constants of stores/redis.py (key prefixes, limits), filled in when it loads this file.

local key, meta = '{SESSION}' .. ARGV[1], '{META}' .. ARGV[1]
if redis.call('EXISTS', key) == 0 then return 0 end
local ttl = tonumber(ARGV[4])
if ARGV[2] == '1' then
  redis.call('PERSIST', key)
  redis.call('PERSIST', meta)
  redis.call('ZREM', KEYS[1], key)
  redis.call('SADD', KEYS[2], key)
elseif redis.call('SREM', KEYS[2], key) == 1 and ttl > 0 then
  redis.call('PEXPIRE', key, ttl)
  redis.call('PEXPIRE', meta, ttl)
  redis.call('ZADD', KEYS[1], string.format('%d', tonumber(ARGV[3]) + ttl), key)
end
record(event(5), ARGV[1])
return 1
