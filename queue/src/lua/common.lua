-- Shared helpers, prepended to every script. ARGV[1] is the key prefix, ARGV[2] the time in ms.
local P = ARGV[1]
local NOW = tonumber(ARGV[2])
local STAGES = {'encoder', 'dit', 'decoder'}
local NEXT = {encoder = 'dit', dit = 'decoder'}
local SPAN = {encoder = {0, 5}, dit = {5, 95}, decoder = {95, 99}}

local function jk(id) return P .. ':job:' .. id end

local function live(stage, rank)
  local s = redis.call('ZSCORE', P .. ':hb', stage .. '-' .. rank)
  return s and tonumber(s) > NOW
end

local function unload(stage, rank)
  if rank and rank ~= '' then
    local n = redis.call('HINCRBY', P .. ':load:' .. stage, rank, -1)
    if n < 0 then redis.call('HSET', P .. ':load:' .. stage, rank, 0) end
  end
end

local function publish(id, kind)
  local h = redis.call('HMGET', jk(id), 'status', 'stage', 'progress', 'step', 'total')
  local stage = cjson.null
  if h[2] and h[2] ~= '' then stage = h[2] end
  local ev = {type = kind, status = h[1], stage = stage, progress = tonumber(h[3]),
              step = tonumber(h[4]), total_steps = tonumber(h[5])}
  redis.call('PUBLISH', P .. ':ev:' .. id, cjson.encode(ev))
end

-- Queues a job for `stage` on its assigned rank, or the shared queue when that rank is dead.
local function enqueue(id, stage, front)
  local rank = redis.call('HGET', jk(id), 'rank_' .. stage)
  if rank and rank ~= '' and not live(stage, rank) then
    unload(stage, rank)
    redis.call('HSET', jk(id), 'rank_' .. stage, '')
    rank = ''
  end
  if not rank or rank == '' then rank = 'any' end
  local q = P .. ':q:' .. stage .. ':' .. rank
  if front then redis.call('LPUSH', q, id) else redis.call('RPUSH', q, id) end
end

local function finish(id, status, ttl)
  local k = jk(id)
  local stage = redis.call('HGET', k, 'stage')
  if stage and stage ~= '' then
    local reached = false
    for _, s in ipairs(STAGES) do
      if s == stage then reached = true end
      if reached then unload(s, redis.call('HGET', k, 'rank_' .. s)) end
    end
    local r = redis.call('HGET', k, 'rank_' .. stage)
    redis.call('LREM', P .. ':q:' .. stage .. ':any', 0, id)
    if r and r ~= '' then redis.call('LREM', P .. ':q:' .. stage .. ':' .. r, 0, id) end
    redis.call('ZREM', P .. ':leases:' .. stage, id)
  end
  redis.call('HSET', k, 'status', status, 'stage', '', 'lease_token', '', 'finished', NOW)
  redis.call('PEXPIRE', k, ttl)
  publish(id, 'status')
end

-- Returns expired leases of `stage` to the shared queue, first in line.
local function expire(stage)
  local ids = redis.call('ZRANGEBYSCORE', P .. ':leases:' .. stage, '-inf', NOW)
  for _, id in ipairs(ids) do
    redis.call('ZREM', P .. ':leases:' .. stage, id)
    local k = jk(id)
    if redis.call('HGET', k, 'stage') == stage and redis.call('HGET', k, 'lease_token') ~= '' then
      unload(stage, redis.call('HGET', k, 'rank_' .. stage))
      redis.call('HSET', k, 'rank_' .. stage, '', 'lease_token', '', 'step', 0, 'total', 0)
      redis.call('LPUSH', P .. ':q:' .. stage .. ':any', id)
    end
  end
  return #ids
end
