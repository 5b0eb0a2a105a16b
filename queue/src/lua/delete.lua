-- ARGV: 3 id, 4 tombstone ttl ms. Returns the job hash, or nil if there is no such (live) job.
local id = ARGV[3]
local k = jk(id)
if redis.call('EXISTS', k) == 0 or redis.call('HGET', k, 'deleted') == '1' then return false end
redis.call('HSET', k, 'deleted', '1', 'cancel', '1')
redis.call('ZREM', P .. ':index:' .. redis.call('HGET', k, 'resource'), id)
local status = redis.call('HGET', k, 'status')
if status == 'queued' or status == 'in_progress' then finish(id, 'cancelled', tonumber(ARGV[4])) end
redis.call('PEXPIRE', k, tonumber(ARGV[4]))
return redis.call('HGETALL', k)
