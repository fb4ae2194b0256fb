#!lua flags=allow-oom
-- uses: clock, fleet, fairshare, job
-- allow-oom: a worker keeps its leases and its place while Redis refuses writes for want
-- of memory (maxmemory with noeviction); its few small writes renew what exists.
-- A worker's tick (shared/scripts.py `heartbeat`): say it is alive, renew the leases of
-- the runs it holds, reap the runs of workers that stopped renewing (queue them again, or
-- fail them after max runs or once their stream had begun), cancel queued jobs whose
-- deadline passed, and forget fair-share counters too low to matter.
-- A run this worker holds whose lease Redis no longer has (after a failover the promoted
-- replica may lack the newest grants) is asserted again when its job is still its own:
-- its slot is counted before any new grant, so the caps hold.
local A = cjson.decode(ARGV[1])
local now = now_ms()
local worker = A.worker
redis.call('ZADD', K_WORKERS, now, worker)
redis.call('HSET', K_WORKER .. worker, 'info', A.info, 'heartbeat', now)
redis.call('PEXPIRE', K_WORKER .. worker, A.worker_stale_ms)
redis.call('ZREMRANGEBYSCORE', K_WORKERS, '-inf', now - A.worker_stale_ms)

local lost, cancelled = {}, {}
for _, held in ipairs(A.held) do
  local run_id = held.run_id
  if redis.call('ZSCORE', K_LEASES, run_id) then
    redis.call('ZADD', K_LEASES, now + A.lease_ms, run_id)
    local job_id = split_run(run_id)
    -- a cancel message can be missed while pub/sub reconnects: say it again here
    if redis.call('HGET', K_JOB .. job_id, 'status') == S_CANCELLED then
      table.insert(cancelled, job_id)
    end
  else
    local job_id, attempt = split_run(run_id)
    local job = read_job(job_id, 'status', 'attempt', 'worker')
    local ours = tonumber(job.attempt) == attempt and job.worker == worker
    if ours and job.status == S_RUNNING then
      redis.call('ZADD', K_LEASES, now + A.lease_ms, run_id)
      redis.call('ZADD', K_BACKEND_RUNNING .. held.backend, now, run_id)
    elseif not ours or job.status == S_QUEUED or job.status == S_RUNNING then
      table.insert(lost, run_id)  -- the job moved on without this run
    end
  end
end

local reaped = redis.call('ZRANGEBYSCORE', K_LEASES, '-inf', now, 'LIMIT', 0, 100)
for _, run_id in ipairs(reaped) do
  local job_id, attempt = split_run(run_id)
  local job = read_job(job_id, 'status', 'attempt', 'owner', 'score', 'runs', 'stream',
    'model', 'priority', 'batch', 'line')
  for i = 2, #ARGV, 3 do redis.call('ZREM', K_BACKEND_RUNNING .. ARGV[i], run_id) end
  free_run(run_id, '', true)
  if job.status and tonumber(job.attempt) == attempt then
    local streamed = job.stream == '1' and redis.call('XLEN', K_EVENTS .. job_id) > 0
    if job.status == S_CANCELLED then
      end_cancelled_run(job_id, A.result_ttl_ms)
    elseif job.status == S_RUNNING and (tonumber(job.runs) >= A.max_runs or streamed) then
      local why = streamed and 'its stream had begun' or ('it ran ' .. job.runs .. ' times')
      finalize(job_id, S_FAILED, {'error', error_json(E_WORKER_LOST,
        'The worker running this job stopped; ' .. why .. ', so it was not run again.')},
        now, A.result_ttl_ms)
    elseif job.status == S_RUNNING then
      requeue(job_id, job, A.record_ttl_ms, {})
    end
  end
end
for _, job_id in ipairs(redis.call('ZRANGEBYSCORE', K_DEADLINES, '-inf', now, 'LIMIT', 0, 100)) do
  local job = read_job(job_id, 'status', 'owner', 'model')
  if job.status == S_QUEUED then
    cancel_queued(job_id, job.owner, job.model, E_DEADLINE_EXCEEDED,
      'The job was still queued when its deadline passed.', now, A.result_ttl_ms)
  else
    redis.call('ZREM', K_DEADLINES, job_id)
  end
end
-- A counter below every floor a waiting key is lifted to is the same as none; so is the
-- counter of a key idle for the fair-share memory (it would come back level anyway).
local floor = math.min(fair_share_floor(),
  tonumber(redis.call('HGET', K_STATS, 'vtc_floor')) or 0)
redis.call('ZREMRANGEBYSCORE', K_VTC, '-inf', '(' .. floor)
-- (an owner that waits again keeps its idle mark, lib/fairshare.lua: not forgotten)
local idle = redis.call('ZRANGEBYSCORE', K_VTC_IDLE, '-inf', now - A.fair_share_memory_ms,
  'LIMIT', 0, 1000)
if #idle > 0 then
  redis.call('ZREM', K_VTC_IDLE, unpack(idle))
  local forgotten = {}
  for _, owner in ipairs(idle) do
    if not redis.call('ZSCORE', K_BACKLOG, owner) then table.insert(forgotten, owner) end
  end
  if #forgotten > 0 then redis.call('ZREM', K_VTC, unpack(forgotten)) end
end
return cjson.encode({lost = lost, cancelled = cancelled, reaped = #reaped})
