-- uses: fleet, job
-- Release a job held at admission once the replicas acknowledged it (shared/scripts.py
-- `release`): from now on it may be dispatched. Its hold deadline gives way to its own.
local A = cjson.decode(ARGV[1])
local job = read_job(A.job_id, 'status', 'held', 'deadline_at')
if not job.status or job.status == S_CANCELLED then return cjson.encode({released = false}) end
if not job.held then return cjson.encode({released = true}) end  -- released before
redis.call('HDEL', K_JOB .. A.job_id, 'held')
local deadline = tonumber(job.deadline_at)
if deadline then
  redis.call('ZADD', K_DEADLINES, deadline, A.job_id)
else
  redis.call('ZREM', K_DEADLINES, A.job_id)
end
wake_one()
return cjson.encode({released = true})
