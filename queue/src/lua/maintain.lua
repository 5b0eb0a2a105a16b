-- Expires leases of every stage and moves dead ranks' queued jobs to the shared queues.
local expired = 0
for _, s in ipairs(STAGES) do expired = expired + expire(s) end
local dead = redis.call('ZRANGEBYSCORE', P .. ':hb', '-inf', NOW)
local moved = 0
for _, wid in ipairs(dead) do
  local stage, rank = string.match(wid, '^(%a+)%-(%d+)$')
  if stage then
    local q = P .. ':q:' .. stage .. ':' .. rank
    while true do
      local id = redis.call('LPOP', q)
      if not id then break end
      redis.call('HSET', jk(id), 'rank_' .. stage, '')
      redis.call('RPUSH', P .. ':q:' .. stage .. ':any', id)
      moved = moved + 1
    end
    redis.call('HDEL', P .. ':load:' .. stage, rank)
  end
  redis.call('ZREM', P .. ':hb', wid)
  redis.call('HDEL', P .. ':workers', wid)
end
return {expired, moved, #dead}
