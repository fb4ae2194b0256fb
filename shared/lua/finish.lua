-- A run ended on its worker: free its slot and record the outcome.
-- A job cancelled while running stays `cancelled`; a run that is no longer the job's
-- current attempt (its lease lapsed and the job moved on) changes nothing.
-- ARGV: 1 job id, 2 attempt, 3 status, 4 http status, 5 content type, 6 result text,
--       7 error JSON ('' none), 8 result ttl ms, 9 duration ms, 10 EWMA weight,
--       11 error code ('' none), 12 breaker threshold, 13 breaker cooldown ms
-- -> {final status, 1 if this ending opened the circuit breaker else 0}
-- Ollama failing (unreachable, 5xx after retries, hung) `threshold` jobs in a row opens the
-- breaker: admission refuses new work until a worker's probe sees Ollama answer again, or
-- `cooldown` passes (then one more failure opens it again). Any answer from Ollama resets.
local job_id, attempt, status = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local result_ttl, duration_ms, alpha = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local now = now_ms()
local run_id = job_id .. '.' .. attempt
local removed = redis.call('ZREM', K_RUNNING, run_id)
redis.call('ZREM', K_LEASES, run_id)
redis.call('ZREM', K_CLAIMS, run_id)
if removed == 1 then redis.call('PUBLISH', K_SLOTS_CHANNEL, run_id) end
local job = redis.call('HMGET', K_JOB .. job_id, 'status', 'attempt')
if tonumber(job[2]) ~= attempt then return 'stale' end
if job[1] == 'running' then
  local fields = {'http_status', ARGV[4], 'content_type', ARGV[5], 'result', ARGV[6]}
  if ARGV[7] ~= '' then table.insert(fields, 'error'); table.insert(fields, ARGV[7]) end
  finalize(job_id, status, fields, now, result_ttl)
elseif job[1] == 'cancelled' then
  local ek = K_EVENTS .. job_id
  redis.call('XADD', ek, '*', 'type', 'end', 'status', 'cancelled')
  redis.call('PEXPIRE', ek, result_ttl)
end
local code = ARGV[11]
if code ~= '' then redis.call('HINCRBY', K_STATS, 'errors_' .. code, 1) end
local opened = 0
if code == 'backend_error' or code == 'timeout' then
  local in_row = redis.call('HINCRBY', K_STATS, 'backend_failures_in_row', 1)
  if in_row >= tonumber(ARGV[12]) and redis.call('EXISTS', K_BREAKER) == 0 then
    redis.call('SET', K_BREAKER, now, 'PX', tonumber(ARGV[13]))
    redis.call('HINCRBY', K_STATS, 'breaker_opened', 1)
    opened = 1
  end
elseif status ~= 'cancelled' then
  redis.call('HSET', K_STATS, 'backend_failures_in_row', 0)
end
if status == 'succeeded' then
  local mean = tonumber(redis.call('HGET', K_STATS, 'mean_job_ms'))
  mean = mean and (mean + alpha * (duration_ms - mean)) or duration_ms
  redis.call('HSET', K_STATS, 'mean_job_ms', tostring(mean))
end
observe('job_duration_seconds', duration_ms / 1000, JOB_DURATION_BOUNDS)
return {job[1] == 'cancelled' and 'cancelled' or status, opened}
