-- A worker's tick: say it is alive, renew the leases of the runs it holds, and reap the
-- runs of workers that stopped renewing (re-queue them, or fail them after max runs), and
-- cancel queued jobs whose deadline passed.
-- ARGV: 1 worker id, 2 lease ms, 3 info JSON, 4 max runs, 5 result ttl ms,
--       6 record ttl ms, 7.. run ids held by this worker
-- -> run ids this worker no longer holds (it must stop them)
local worker, lease, max_runs = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])
local result_ttl, record_ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_ms()
redis.call('ZADD', K_WORKERS, now, worker)
redis.call('HSET', K_WORKER .. worker, 'info', ARGV[3], 'heartbeat', now)
redis.call('PEXPIRE', K_WORKER .. worker, lease * 3)
redis.call('ZREMRANGEBYSCORE', K_WORKERS, '-inf', now - lease * 3)

local lost = {}
for i = 7, #ARGV do
  if redis.call('ZSCORE', K_LEASES, ARGV[i]) then
    redis.call('ZADD', K_LEASES, now + lease, ARGV[i])
  else
    table.insert(lost, ARGV[i])
  end
end

local reaped = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, 100)
for _, run_id in ipairs(reaped) do
  redis.call('ZREM', K_LEASES, run_id)
  redis.call('ZREM', K_CLAIMS, run_id)
  redis.call('ZREM', K_RUNNING, run_id)
  arq_forget(run_id)
  local job_id, attempt = split_run(run_id)
  local jk = K_JOB .. job_id
  local job = redis.call('HMGET', jk, 'status', 'attempt', 'owner', 'score', 'runs', 'stream')
  if job[1] and tonumber(job[2]) == attempt then
    local streamed = job[6] == '1' and redis.call('XLEN', K_EVENTS .. job_id) > 0
    if job[1] == 'cancelled' then
      local ek = K_EVENTS .. job_id
      redis.call('XADD', ek, '*', 'type', 'end', 'status', 'cancelled')
      redis.call('PEXPIRE', ek, result_ttl)
    elseif job[1] == 'running' and (tonumber(job[5]) >= max_runs or streamed) then
      local why = streamed and 'its stream had begun' or ('it ran ' .. job[5] .. ' times')
      finalize(job_id, 'failed', {'error', error_json('worker_lost',
        'The worker running this job stopped; ' .. why .. ', so it was not run again.')},
        now, result_ttl)
    elseif job[1] == 'running' or job[1] == 'queued' then
      redis.call('HSET', jk, 'status', 'queued', 'attempt', attempt + 1, 'worker', '',
        'started_at', '')
      redis.call('PEXPIRE', jk, record_ttl)
      redis.call('ZADD', K_QUEUED, tonumber(job[4]), job_id)
      redis.call('SADD', K_QUEUED_BY .. job[3], job_id)
      arq_enqueue(job_id, attempt + 1, tonumber(job[4]), now, record_ttl)
      redis.call('HINCRBY', K_STATS, 'jobs_requeued', 1)
    end
  end
end
for _, job_id in ipairs(redis.call('ZRANGEBYSCORE', K_DEADLINES, '-inf', now, 'LIMIT', 0, 100)) do
  expire_queued(job_id, now, result_ttl)
end
if #reaped > 0 then
  redis.call('PUBLISH', K_SLOTS_CHANNEL, 'reaped')
  redis.call('PUBLISH', K_WAKE_CHANNEL, 'reaped')
end
return lost
