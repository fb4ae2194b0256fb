-- Cancel a job for its owner (owner '' = the gateway itself, e.g. a sync timeout)
-- (shared/scripts.py `cancel`). Queued: it never starts. Running: its holder is told to
-- close the Ollama request; the slot frees when the holder stops (finish.lua) or its
-- lease lapses. With `only_if_queued`, a running job is left to run.
local A = cjson.decode(ARGV[1])
local now = now_ms()
local job = read_job(A.job_id, 'status', 'owner', 'attempt', 'model')
if not job.status or (A.owner ~= '' and job.owner ~= A.owner) then
  return cjson.encode({verdict = 'not_found'})
end
local status = job.status
if status ~= 'queued' and status ~= 'running' then
  return cjson.encode({verdict = 'finished', status = status})
end
if status == 'running' and A.only_if_queued then
  return cjson.encode({verdict = 'running', status = status})
end
if status == 'queued' then
  cancel_queued(A.job_id, job.owner, job.model, job.attempt, A.code, A.message, now,
    A.result_ttl_ms)
else
  local jk = K_JOB .. A.job_id
  redis.call('HSET', jk, 'status', 'cancelled', 'finished_at', now,
    'error', error_json(A.code, A.message))
  redis.call('PEXPIRE', jk, A.result_ttl_ms)
  redis.call('HINCRBY', K_STATS, 'jobs_cancelled', 1)
  redis.call('PUBLISH', K_CANCEL_CHANNEL, A.job_id)
end
return cjson.encode({verdict = 'cancelled', status = status})
