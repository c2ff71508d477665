-- Revoke a share link for good (needs activity.lua): its token stops opening it at once, and the `revoke` event
-- is recorded; revoking it again changes nothing.
--
-- ARGV: share id, then the event (see activity.lua: ARGV[2..6]).
-- Returns 1 when this user has the share, else 0.
--
-- Names in braces are constants of stores/redis.py (key prefixes, limits), filled in when it loads this file.

local held = redis.call('HGET', '{SHARES}', ARGV[1])
if not held then return 0 end
if string.find(held, '"revoked":true', 1, true) then return 1 end
-- The record is the service's own JSON ("revoked" its last field): changed as text, so no number is rounded.
redis.call('HSET', '{SHARES}', ARGV[1], (string.gsub(held, '"revoked":false', '"revoked":true', 1)))
redis.call('HDEL', '{SHARES}:tokens', string.match(held, '"tokenSha256":"(%x+)"'))
record(event(2), string.match(held, '"timestamp":(%d+)'))
return 1
