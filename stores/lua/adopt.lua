-- Index the given session keys that exist but are not indexed (another tool SET them and left the index alone),
-- track the expiry of those with a TTL, and name those whose summary or facets need recording anew: none yet, or
-- a summary of another size than the key holds (another tool rewrote it). O(keys given), no value is read.
--
-- KEYS: index, expiry.
-- ARGV: now (ms), then the session keys.
-- Returns {keys that exist, keys indexed, {stale ids}}.
--
-- Names in braces are constants of stores/redis.py (key prefixes, limits), filled in when it loads this file.

local now, existing, indexed, stale = tonumber(ARGV[1]), 0, 0, {}
for i = 2, #ARGV do
  local key = ARGV[i]
  local left = redis.call('PTTL', key)
  if left ~= -2 then
    local id = string.sub(key, {ID_AT})
    existing = existing + 1
    if not redis.call('ZSCORE', KEYS[1], key) then
      redis.call('ZADD', KEYS[1], id, key)
      indexed = indexed + 1
    end
    if left > 0 and not redis.call('ZSCORE', KEYS[2], key) then
      redis.call('ZADD', KEYS[2], string.format('%d', now + left), key)
    end
    local facets, meta = redis.call('HGET', '{FACETS}', id), redis.call('GET', '{META}' .. id)
    if not facets
        or (meta and tonumber(string.match(meta, '"sizeBytes":(%d+)')) ~= redis.call('STRLEN', key))
        or (not meta and facets ~= '["","","",' .. id .. ']') then
      stale[#stale + 1] = id
    end
  end
end
return {existing, indexed, stale}
