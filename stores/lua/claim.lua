-- Claim one due time of the backup schedule for one process of all that share this Redis, once.
--
-- KEYS: the due time's lease, the cursor (the latest due time any host claimed).
-- ARGV: the caller (host:pid), the lease (ms), the due time (ms).
-- Returns 1 when the caller took it (and the cursor moved up to it), 0 when another process had.

if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  if tonumber(ARGV[3]) > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], ARGV[3]) end
  return 1
end
return 0
