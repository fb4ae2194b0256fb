-- Cancel a job for its owner (owner '' = the gateway itself, e.g. a sync timeout).
-- Queued: it never starts. Running: its holder is told to close the Ollama request;
-- the slot frees when the holder stops (finish.lua) or its lease lapses.
-- ARGV: 1 job id, 2 owner ('' any), 3 error code, 4 message, 5 result ttl ms,
--       6 only if queued 0|1
-- -> {'not_found'} | {'finished', status} | {'cancelled', previous status} | {'running'}
local job_id, owner, result_ttl = ARGV[1], ARGV[2], tonumber(ARGV[5])
local now = now_ms()
local jk = K_JOB .. job_id
local job = redis.call('HMGET', jk, 'status', 'owner', 'attempt')
if not job[1] or (owner ~= '' and job[2] ~= owner) then return {'not_found'} end
local status = job[1]
if status ~= 'queued' and status ~= 'running' then return {'finished', status} end
if status == 'running' and ARGV[6] == '1' then return {'running'} end
local err = error_json(ARGV[3], ARGV[4])
if status == 'queued' then
  local run_id = job_id .. '.' .. job[3]
  unqueue(job_id, job[2])
  redis.call('ZREM', K_CLAIMS, run_id)
  redis.call('ZREM', K_LEASES, run_id)
  if redis.call('EXISTS', K_ARQ_IN_PROGRESS .. run_id) == 0 then arq_forget(run_id) end
  finalize(job_id, 'cancelled', {'error', err}, now, result_ttl)
else
  redis.call('HSET', jk, 'status', 'cancelled', 'finished_at', now, 'error', err)
  redis.call('PEXPIRE', jk, result_ttl)
  redis.call('HINCRBY', K_STATS, 'jobs_cancelled', 1)
end
redis.call('PUBLISH', K_CANCEL_CHANNEL, job_id)
return {'cancelled', status}
