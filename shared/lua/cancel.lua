-- uses: clock, job
-- Cancel a job for its owner (owner '' = the gateway itself, e.g. a sync timeout)
-- (shared/scripts.py `cancel`). Queued: it never starts. Running: its holder is told to
-- close the Ollama request; the slot frees when the holder stops (finish.lua) or its
-- lease lapses. With `only_if_queued`, a running job is left to run.
local A = cjson.decode(ARGV[1])
local now = now_ms()
local job = read_job(A.job_id, 'status', 'owner', 'model', 'batch')
-- a batch's line is cancelled with its batch (POST /v1/batches/{id}/cancel)
if not job.status or (A.owner ~= '' and job.owner ~= A.owner) or job.batch then
  return cjson.encode({verdict = 'not_found'})
end
local status = job.status
if status ~= S_QUEUED and status ~= S_RUNNING then
  return cjson.encode({verdict = 'finished', status = status})
end
if status == S_RUNNING and A.only_if_queued then
  return cjson.encode({verdict = S_RUNNING, status = status})
end
if status == S_QUEUED then
  cancel_queued(A.job_id, job.owner, job.model, A.code, A.message, now, A.result_ttl_ms)
else
  cancel_running(A.job_id, A.code, A.message, now, A.result_ttl_ms)
end
return cjson.encode({verdict = S_CANCELLED, status = status})
