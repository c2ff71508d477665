-- Save one session atomically (needs forget.lua, prune.lua, assign.lua, activity.lua): a save, or the write-back
-- of a copy a local store kept while Redis was away.
--
-- KEYS: index, expiry, clock, pinned, the staged body.
-- ARGV: the timestamp the body was rendered with, summary, now (ms), TTL (ms; 0: none), the client's timestamp or
--   "", the allocator's proposal, for a write-back the session's origin ("client" or "service"; "" for a save), the
--   save's id, "1" to pin it (a write-back of a pinned session), its facets, for a write-back when the pending copy
--   was acknowledged (ms), the body itself when it is small (else "": it is staged), and the save's event (see
--   activity.lua: ARGV[13..17]; none for a write-back, whose event has its own).
-- Returns {outcome, timestamp, the unconfirmed copy removed or ""}, and a fourth item when the timestamp was
--   chosen and the clock key held no trusted value: what it held (see assign.lua), replaced.
--
-- A pinned session saved again stays pinned, without a TTL.
-- A save without a timestamp whose id was applied before to these very bytes (a retried import: its id comes
-- from its content) is not stored again: 'already' and that timestamp.
-- A save is acknowledged now, or just after the copy it replaces or the delete before it, whichever is later
-- (so the order holds when clocks differ a little); `storyart:sessions:acked` records it.
-- A write-back is ordered by when its copy was acknowledged: a delete of its timestamp since ('deleted') or a
-- *different* copy acknowledged later ('superseded') wins over it; for a service-assigned timestamp a different
-- session there is another one that met it (two processes chose the same millisecond): both are kept, the
-- written-back one under the next free timestamp ('renumbered'). Expiry and pins play no part. A copy of this
-- very attempt that Redis applied without confirming it (same save id and bytes, same acknowledgement time, so
-- the same request's fallback) is removed; a copy the save id names that was confirmed (a retried import) or
-- pinned never is.
--
-- A large body never passes through Lua on the way in: the same pipeline SETs it, rendered with the timestamp the
-- caller expects, under a staged key of its own (KEYS[5], with a short TTL) just before, and the script RENAMEs
-- that key to the session's (a pointer move), overwriting the timestamp's digits in place when another was
-- chosen. A 1 MB value moved through Lua costs Redis about 1.4 ms of copying and garbage more than a SET
-- (docs/benchmarks.md). Only the rare comparisons below (a retried import, a write-back meeting a copy) read it.
-- A small body (up to `INLINE_BODY_MAX`) comes as the last argument instead: one command, no staged key.
--
-- Names in braces are constants of stores/redis.py (key prefixes, limits), filled in when it loads this file.

local function fmt(n) return string.format('%d', n) end
local staged, staged_id = KEYS[5], ARGV[1]
local summary, now, ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local ts, proposal, origin, acked = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], tonumber(ARGV[11])
local clock, save = KEYS[3], '{SAVE}' .. ARGV[8]
local outcome, removed, distrusted = 'stored', '', nil
local inline = ARGV[12] ~= ''
if not inline and redis.call('EXISTS', staged) == 0 then
  return redis.error_reply('the staged body of save ' .. ARGV[8] .. ' is gone')
end
local staged_body = inline and ARGV[12] or nil
local function rendered(id)  -- the session's bytes as stored under `id`
  staged_body = staged_body or redis.call('GET', staged)
  if id == staged_id then return staged_body end
  return string.sub(staged_body, 1, #staged_body - #staged_id - 1) .. id .. '}'
end
local function done(reply)
  if not inline then redis.call('DEL', staged) end
  return reply
end
local applied = redis.call('GET', save)
if origin == '' and not ts and applied and redis.call('GET', '{SESSION}' .. applied) == rendered(applied) then
  return done({'already', applied, ''})
end
if origin ~= '' then
  local dead = redis.call('GET', '{DELETED}' .. fmt(ts))
  if dead and acked <= tonumber(dead) then return done({'deleted', fmt(ts), ''}) end
  if applied and tonumber(applied) ~= ts and redis.call('HGET', '{ACKED}', applied) == fmt(acked)
      and redis.call('SISMEMBER', KEYS[4], '{SESSION}' .. applied) == 0
      and redis.call('GET', '{SESSION}' .. applied) == rendered(applied) then
    redis.call('DEL', '{SESSION}' .. applied, '{META}' .. applied)  -- applied, never confirmed to anyone
    forget(KEYS[1], KEYS[2], KEYS[4], '{SESSION}' .. applied)
    removed = applied
  end
  local current = redis.call('GET', '{SESSION}' .. fmt(ts))
  if current then
    local theirs = tonumber(redis.call('HGET', '{ACKED}', fmt(ts)) or '0')
    if current == rendered(fmt(ts)) then
      acked = math.max(acked, theirs)
    elseif origin == 'service' then
      proposal, ts, outcome = ts, nil, 'renumbered'
    elseif theirs > acked then
      return done({'superseded', fmt(ts), removed})
    end
  end
end
if not ts then
  ts, distrusted = assign(clock, proposal, now)
  if not ts then
    return done(redis.error_reply('no free timestamp among the {PROBES} from ' .. fmt(proposal) .. ' on'))
  end
end
local id = fmt(ts)
local key = '{SESSION}' .. id
if not acked then
  acked = math.max(now, tonumber(redis.call('HGET', '{ACKED}', id) or '-1') + 1,
                   tonumber(redis.call('GET', '{DELETED}' .. id) or '-1') + 1)
end
if ARGV[9] == '1' or redis.call('SISMEMBER', KEYS[4], key) == 1 then
  redis.call('SADD', KEYS[4], key)
  ttl = 0
end
if inline then
  redis.call('SET', key, rendered(id))
elseif id == staged_id or #id == #staged_id then
  if id ~= staged_id then  -- the digits in place: the length stays, nothing is reallocated
    redis.call('SETRANGE', staged, redis.call('STRLEN', staged) - #id - 1, id)
  end
  redis.call('RENAME', staged, key)
else  -- another number of digits (never within this millennium): rendered anew
  redis.call('SET', key, rendered(id))
  redis.call('DEL', staged)
end
if ttl > 0 then
  redis.call('PEXPIRE', key, fmt(ttl))
  redis.call('SET', '{META}' .. id, summary, 'PX', fmt(ttl))
  redis.call('ZADD', KEYS[2], fmt(now + ttl), key)
else
  redis.call('PERSIST', key)
  redis.call('SET', '{META}' .. id, summary)
  redis.call('ZREM', KEYS[2], key)
end
redis.call('SET', save, id, 'PX', fmt(ttl > 0 and ttl or {SAVE_ID_TTL}))
redis.call('ZADD', KEYS[1], id, key)
redis.call('HSET', '{ACKED}', id, fmt(acked))
facet(key, id, ARGV[10])
prune(KEYS[1], KEYS[2], KEYS[4], now)
record(event(13), id)
return {outcome, id, removed, distrusted}
