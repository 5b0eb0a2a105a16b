-- Operations on a held lease. ARGV: 3 op, 4 id, 5 stage, 6 token, 7.. op arguments.
-- Replies: 'ok', 'cancel' (lease held but the job was cancelled), 'cancelled', 'lost'.
local op, id, stage, token = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local k = jk(id)

-- Appends the output records `added` to the job's outputs.
local function append_outputs(added)
  local merged = cjson.decode(redis.call('HGET', k, 'outputs'))
  for _, o in ipairs(added) do table.insert(merged, o) end
  redis.call('HSET', k, 'outputs', cjson.encode(merged))
end
local h = redis.call('HMGET', k, 'lease_token', 'stage', 'cancel', 'rank_' .. stage, 'progress')
if not (h[1] == token and h[2] == stage) then
  if h[3] == '1' then return 'cancelled' end
  return 'lost'
end
if h[3] == '1' then return 'cancel' end
if op == 'extend' then
  redis.call('ZADD', P .. ':leases:' .. stage, NOW + tonumber(ARGV[7]), id)
elseif op == 'progress' then
  local step, total = tonumber(ARGV[7]), tonumber(ARGV[8])
  local lo, hi = SPAN[stage][1], SPAN[stage][2]
  local frac = 0
  if total > 0 then frac = math.min(step, total) / total end
  local p = math.max(tonumber(h[5]), math.floor(lo + frac * (hi - lo)))
  redis.call('HSET', k, 'step', step, 'total', total, 'progress', p)
  publish(id, 'progress')
elseif op == 'partial' then
  append_outputs({cjson.decode(ARGV[7])})
  publish(id, 'partial')
elseif op == 'complete' then
  local added = cjson.decode(ARGV[7])
  if #added > 0 then append_outputs(added) end
  redis.call('ZREM', P .. ':leases:' .. stage, id)
  local nxt = NEXT[stage]
  if nxt then
    unload(stage, h[4])
    redis.call('HSET', k, 'stage', nxt, 'lease_token', '', 'step', 0, 'total', 0,
      'progress', math.max(tonumber(h[5]), SPAN[stage][2]))
    enqueue(id, nxt, false)
    publish(id, 'status')
  else
    redis.call('HSET', k, 'progress', 100)
    finish(id, 'completed', tonumber(ARGV[8]))
  end
elseif op == 'fail' then
  -- 7 code, 8 message, 9 finished ttl, 10 kind (appended last to keep older callers' order)
  redis.call('HSET', k, 'err_code', ARGV[7], 'err_msg', ARGV[8], 'err_kind', ARGV[10])
  finish(id, 'failed', tonumber(ARGV[9]))
elseif op == 'release' then
  redis.call('ZREM', P .. ':leases:' .. stage, id)
  redis.call('HSET', k, 'lease_token', '', 'step', 0, 'total', 0)
  enqueue(id, stage, true)
end
return 'ok'
