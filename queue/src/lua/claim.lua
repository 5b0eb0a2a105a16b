-- ARGV: 3 stage, 4 rank, 5 lease ms, 6 token. Returns the job hash, or nil when nothing is waiting.
local stage, rank = ARGV[3], ARGV[4]
expire(stage)
for _, q in ipairs({P .. ':q:' .. stage .. ':' .. rank, P .. ':q:' .. stage .. ':any'}) do
  while true do
    local id = redis.call('LPOP', q)
    if not id then break end
    local k = jk(id)
    local h = redis.call('HMGET', k, 'status', 'stage', 'cancel', 'rank_' .. stage, 'progress')
    if (h[1] == 'queued' or h[1] == 'in_progress') and h[2] == stage and h[3] ~= '1' then
      if h[4] == '' then redis.call('HINCRBY', P .. ':load:' .. stage, rank, 1) end
      local progress = math.max(tonumber(h[5]), SPAN[stage][1])
      redis.call('HSET', k, 'rank_' .. stage, rank, 'status', 'in_progress', 'lease_token', ARGV[6],
        'step', 0, 'total', 0, 'progress', progress)
      redis.call('HINCRBY', k, 'attempts', 1)
      redis.call('ZADD', P .. ':leases:' .. stage, NOW + tonumber(ARGV[5]), id)
      publish(id, 'status')
      return redis.call('HGETALL', k)
    end
  end
end
return false
