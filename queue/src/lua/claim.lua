-- ARGV: 3 stage, 4 rank, 5 lease ms, 6 token, 7 JSON array of the worker's models, 8 JSON array
-- of its tasks.
-- Returns the job hash, or nil when nothing is waiting for this worker.
-- Takes the oldest job of a model and task the worker serves, from its rank's queue, then the
-- shared one; other jobs stay where they are (ranks are per stage, several models may share a
-- queue prefix, and one model may be served by workers of different tasks). Entries of jobs that
-- no longer wait for this stage are dropped on the way.
local stage, rank = ARGV[3], ARGV[4]
local models, tasks = {}, {}
for _, m in ipairs(cjson.decode(ARGV[7])) do models[m] = true end
for _, t in ipairs(cjson.decode(ARGV[8])) do tasks[t] = true end

-- The first job in `q` this worker may take (removed from `q`), reading the list a page at a time.
local function take(q)
  local start = 0
  while true do
    local ids = redis.call('LRANGE', q, start, start + 255)
    if #ids == 0 then return nil end
    local dropped = 0
    for _, id in ipairs(ids) do
      local h = redis.call('HMGET', jk(id), 'status', 'stage', 'cancel', 'spec')
      if not ((h[1] == 'queued' or h[1] == 'in_progress') and h[2] == stage and h[3] ~= '1') then
        redis.call('LREM', q, 1, id)
        dropped = dropped + 1
      else
        local spec = cjson.decode(h[4])
        if models[spec.model] and tasks[spec.task] then
          redis.call('LREM', q, 1, id)
          return id
        end
      end
    end
    start = start + #ids - dropped
  end
end

expire(stage)
for _, q in ipairs({P .. ':q:' .. stage .. ':' .. rank, P .. ':q:' .. stage .. ':any'}) do
  local id = take(q)
  if id then
    local k = jk(id)
    local h = redis.call('HMGET', k, 'rank_' .. stage, 'progress')
    if h[1] == '' then redis.call('HINCRBY', P .. ':load:' .. stage, rank, 1) end
    local progress = math.max(tonumber(h[2]), SPAN[stage][1])
    redis.call('HSET', k, 'rank_' .. stage, rank, 'status', 'in_progress', 'lease_token', ARGV[6],
      'step', 0, 'total', 0, 'progress', progress)
    redis.call('HINCRBY', k, 'attempts', 1)
    redis.call('ZADD', P .. ':leases:' .. stage, NOW + tonumber(ARGV[5]), id)
    publish(id, 'status')
    return redis.call('HGETALL', k)
  end
end
return false
