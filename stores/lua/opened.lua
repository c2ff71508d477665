-- Count openings of a share link (needs activity.lua): one, with its `share-opened` event, or the write-back of
-- those a local store counted while Redis was away, applied once however often it is sent (its marker).
--
-- ARGV: share id, openings, the write-back's marker ("" for an opening now), then the event (see activity.lua:
--   ARGV[4..8]) and the session's timestamp.
-- Returns 1, or 0 when the marker says this write-back was applied before.
--
-- Names in braces are constants of stores/redis.py (key prefixes, limits), filled in when it loads this file.

if ARGV[3] ~= '' and not redis.call('SET', '{SHARES}:applied:' .. ARGV[3], '1', 'NX', 'PX', 86400000) then
  return 0
end
redis.call('HINCRBY', '{SHARES}:opened', ARGV[1], ARGV[2])
record(event(4), ARGV[9])
return 1
