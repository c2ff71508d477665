-- A library, prepended to the scripts that call it (stores/redis.py composes them): keeps the list filters'
-- facets and forgets sessions that are gone.
--
-- A session that is gone leaves every structure of the service: the index, the expiry and pinned sets, and the
-- list filters' facets (`storyart:sessions:facets` says which story and episode sets hold it).
-- `facet(key, id, facets)` records a session's facets, replacing older ones: given as a JSON array (story,
-- episode, casefolded title; "" for none), stored with the timestamp appended, so a title search reads every
-- session's facets with one HVALS. `unfacet(key, id)` removes them. `forget(index, expiry, pinned, key)` removes
-- a session key from every structure but the key itself (and its summary, which the caller deletes).
--
-- Names in braces are constants of stores/redis.py (key prefixes, limits), filled in when it loads this file.

local function unfacet(key, id)
  local facets = redis.call('HGET', '{FACETS}', id)
  if not facets then return end
  local f = cjson.decode(facets)
  if f[1] ~= '' then redis.call('ZREM', '{STORY}' .. f[1], key) end
  if f[2] ~= '' then redis.call('ZREM', '{EPISODE}' .. f[2], key) end
  redis.call('HDEL', '{FACETS}', id)
end
local function facet(key, id, facets)
  facets = string.sub(facets, 1, -2) .. ',' .. id .. ']'
  if redis.call('HGET', '{FACETS}', id) == facets then return end
  unfacet(key, id)
  local f = cjson.decode(facets)
  redis.call('HSET', '{FACETS}', id, facets)
  if f[1] ~= '' then redis.call('ZADD', '{STORY}' .. f[1], id, key) end
  if f[2] ~= '' then redis.call('ZADD', '{EPISODE}' .. f[2], id, key) end
end
local function forget(index, expiry, pinned, key)
  redis.call('ZREM', index, key)
  redis.call('ZREM', expiry, key)
  redis.call('SREM', pinned, key)
  unfacet(key, string.sub(key, {ID_AT}))
  redis.call('HDEL', '{ACKED}', string.sub(key, {ID_AT}))
end
