-- A worker holds run `job.attempt`: renew its lease, and start it if a GPU slot is free
-- and no held job ahead of it (by start score: priority, then age) is waiting.
-- ARGV: 1 job id, 2 attempt, 3 worker id, 4 lease ms, 5 default cap, 6 result ttl ms
-- -> {'run', endpoint, body, stream} | {'wait'} | {'stale'} (nothing for this run to do)
local job_id, attempt, worker = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local lease, default_cap, result_ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_ms()
local jk = K_JOB .. job_id
local run_id = job_id .. '.' .. attempt
local job = redis.call('HMGET', jk, 'status', 'attempt', 'score', 'deadline_at', 'owner',
  'created_at', 'runs')
if job[1] ~= 'queued' or tonumber(job[2]) ~= attempt then
  redis.call('ZREM', K_CLAIMS, run_id)
  redis.call('ZREM', K_LEASES, run_id)
  return {'stale'}
end
local deadline = tonumber(job[4])
if deadline and now >= deadline then
  expire_queued(job_id, now, result_ttl)
  return {'stale'}
end
redis.call('ZADD', K_LEASES, now + lease, run_id)
redis.call('ZADD', K_CLAIMS, 'NX', tonumber(job[3]), run_id)
local free = current_cap(default_cap) - redis.call('ZCARD', K_RUNNING)
if free <= 0 or redis.call('ZRANK', K_CLAIMS, run_id) >= free then
  return {'wait'}
end
redis.call('ZREM', K_CLAIMS, run_id)
redis.call('ZADD', K_RUNNING, now, run_id)
unqueue(job_id, job[5])
redis.call('HSET', jk, 'status', 'running', 'started_at', now, 'worker', worker,
  'runs', tonumber(job[7]) + 1)
observe('queue_wait_seconds', (now - tonumber(job[6])) / 1000, QUEUE_WAIT_BOUNDS)
local fields = redis.call('HMGET', jk, 'endpoint', 'body', 'stream')
return {'run', fields[1], fields[2], fields[3]}
