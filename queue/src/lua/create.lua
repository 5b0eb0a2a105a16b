-- ARGV: 3 id, 4 resource, 5 spec, 6 trace, 7..9 ranks (encoder, dit, decoder; '' = any),
--       10 idempotency key ('' = none), 11 fingerprint, 12 idempotency ttl ms
local id, idem = ARGV[3], ARGV[10]
if idem ~= '' then
  local prior = redis.call('GET', P .. ':idem:' .. idem)
  if prior then
    local k = jk(prior)
    if redis.call('EXISTS', k) == 1 and redis.call('HGET', k, 'deleted') ~= '1' then
      if redis.call('HGET', k, 'fp') ~= ARGV[11] then return {'mismatch'} end
      local all = redis.call('HGETALL', k)
      table.insert(all, 1, 'existing')
      return all
    end
  end
end
local k = jk(id)
redis.call('HSET', k, 'id', id, 'resource', ARGV[4], 'spec', ARGV[5], 'trace', ARGV[6],
  'rank_encoder', ARGV[7], 'rank_dit', ARGV[8], 'rank_decoder', ARGV[9],
  'status', 'queued', 'stage', 'encoder', 'progress', 0, 'step', 0, 'total', 0, 'finished', '',
  'outputs', '[]', 'attempts', 0, 'cancel', '0', 'deleted', '0', 'lease_token', '', 'fp', ARGV[11])
for i, s in ipairs(STAGES) do
  local r = ARGV[6 + i]
  if r ~= '' then redis.call('HINCRBY', P .. ':load:' .. s, r, 1) end
end
redis.call('ZADD', P .. ':index:' .. ARGV[4], 0, id)
enqueue(id, 'encoder', false)
if idem ~= '' then redis.call('SET', P .. ':idem:' .. idem, id, 'PX', ARGV[12]) end
return {'created'}
