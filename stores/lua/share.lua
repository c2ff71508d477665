-- Store a share link (needs activity.lua): a new one with its `share` event, or the write-back of one a local
-- store kept while Redis was away, applied once however often it is sent (its marker).
--
-- `{SHARES}` is a hash, share id -> the share's record (JSON); `{SHARES}:tokens` maps the SHA-256 of each live
-- token to its share id; `{SHARES}:opened` counts each share's openings.
-- ARGV: id, record, token SHA-256, "1" if revoked, openings to add, the write-back's marker ("" for a new share),
--   then the event (see activity.lua: ARGV[7..11]) and the session's timestamp.
-- Returns 1, or 0 when the marker says this write-back was applied before.
--
-- Names in braces are constants of stores/redis.py (key prefixes, limits), filled in when it loads this file.

if ARGV[6] ~= '' and not redis.call('SET', '{SHARES}:applied:' .. ARGV[6], '1', 'NX', 'PX', 86400000) then
  return 0
end
redis.call('HSET', '{SHARES}', ARGV[1], ARGV[2])
if ARGV[4] ~= '1' then redis.call('HSET', '{SHARES}:tokens', ARGV[3], ARGV[1]) end
if tonumber(ARGV[5]) > 0 then redis.call('HINCRBY', '{SHARES}:opened', ARGV[1], ARGV[5]) end
record(event(7), ARGV[12])
return 1
