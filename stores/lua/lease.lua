-- Hold the reconciler's lease, so one process of all that share this Redis reconciles at a time.
--
-- KEYS: the lease.
-- ARGV: the caller's token, the lease (ms).
-- Returns 1 when the caller holds it now (taken, or renewed), else 0.

local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
