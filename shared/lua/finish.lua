-- uses: clock, buckets, fairshare, job
-- A run ended on its worker (shared/scripts.py `finish`): give its slot back, charge what
-- Ollama served (fair-share counter, tpm bucket, budget), and record the outcome. (Usage,
-- the end's count and the histograms are the worker's tally: worker/tally.py.)
-- `retry`: the backend failed before any byte reached the client: the job is queued
-- again avoiding that backend (failed instead once it ran max_attempts times).
-- A job cancelled while running stays `cancelled`; a run that is no longer the job's
-- current attempt (its lease lapsed and the job moved on) changes nothing.
-- Any backend answer resets its failure count; `breaker_threshold` failures in a row
-- (unreachable, 5xx after retries, hung) take it out of dispatch for `breaker_cooldown_ms`
-- or until a worker's probe sees it answer.
-- `waiting` in the reply: whether any job or batch line waits for a slot (else the
-- worker need not ask the scheduler for the place this run frees: an admission wakes it).
local A = cjson.decode(ARGV[1])
local now = now_ms()
local job_id = A.job_id
local run_id = run_of(job_id, A.attempt)
local job = read_job(job_id, 'status', 'attempt', 'backend', 'owner', 'usage_name', 'model',
  'weight', 'vtc_charged', 'reserved_tokens', 'tpm_rate', 'tpm_burst', 'runs', 'score',
  'priority', 'avoid', 'started_at', 'sync', 'inbox', 'budget_key', 'budget_reserved', 'hook',
  'batch', 'line', 'custom_id')
local backend = A.backend
free_run(run_id, backend, A.wake)

local ended = false  -- this run ended its job (not a batch line's): the worker counts it
local function reply(status, opened)
  local waiting = redis.call('EXISTS', K_QUEUED, K_BATCH_BACKLOG) > 0
  return cjson.encode({status = status, breaker_opened = opened, ended = ended,
    waiting = waiting})
end
if tonumber(job.attempt) ~= A.attempt then return reply(RUN_STALE, false) end

-- what was served: charged whether the job succeeded or not. `record`: the job's fields
-- this run sets, written with its status below (one HSET).
local served = A.input_tokens + A.output_tokens
local record = {}
local function note(...)
  for _, v in ipairs({...}) do table.insert(record, v) end
end
if served > 0 or A.duration_ms > 0 then
  local weight = tonumber(job.weight) or 1
  local cost = (A.input_tokens + 2 * A.output_tokens) / weight
  local settled = cost - (tonumber(job.vtc_charged) or 0)
  if job.batch then charge_batch(job.owner, settled) else charge(job.owner, settled, now) end
  note('vtc_charged', 0, 'input_tokens', A.input_tokens, 'output_tokens', A.output_tokens)
  local rate = tonumber(job.tpm_rate) or 0
  if rate > 0 then
    local burst, key = tonumber(job.tpm_burst), K_TOKEN_BUCKET .. job.owner
    local level = bucket_level(key, rate, burst, now)
    level = level + (tonumber(job.reserved_tokens) or 0) - served
    bucket_store(key, level, rate, burst, now)
    note('reserved_tokens', 0)
  end
end
-- The key's budget (admit.lua reserved what the request named): what was served is
-- charged, and the reservation returned once the job will not run again.
local function settle_budget(final)
  if not job.budget_key then return end
  local delta = served - (final and (tonumber(job.budget_reserved) or 0) or 0)
  if delta ~= 0 and redis.call('EXISTS', job.budget_key) == 1 then
    redis.call('INCRBY', job.budget_key, delta)
  end
  if final then note('budget_reserved', 0) end
end
settle_budget(not (job.status == S_RUNNING and A.status == RUN_RETRY
  and tonumber(job.runs) < A.max_attempts))
if A.model_load_ms > 0 then
  redis.call('HINCRBY', K_MODEL_LOADS, backend .. '|' .. (job.model or ''), 1)
end
if A.cold and A.status ~= RUN_RETRY then
  -- what a load costs there (none, for a backend that loads at once): dispatch weighs
  -- it against waiting (lib/schedule.lua load_ms)
  -- (`*|model`: the last one seen anywhere, the guess for a backend that never loaded it)
  local where = backend .. '|' .. (job.model or '')
  local mean = tonumber(redis.call('HGET', K_LOAD_MS, where))
  redis.call('HSET', K_LOAD_MS, where,
    tostring(mean and (mean + A.ewma_weight * (A.model_load_ms - mean)) or A.model_load_ms),
    '*|' .. (job.model or ''), tostring(A.model_load_ms))
end

local status = A.status
if job.status == S_RUNNING then
  if status == RUN_RETRY and tonumber(job.runs) < A.max_attempts then
    local avoid = ((job.avoid or '') .. ' ' .. backend):gsub('^ ', '')
    note('avoid', avoid)
    requeue(job_id, job, A.record_ttl_ms, record)
  else
    if status == RUN_RETRY then status = S_FAILED end
    local fields = {'http_status', A.http_status, 'content_type', A.content_type,
      'result', A.result}
    if A.error ~= '' then table.insert(fields, 'error'); table.insert(fields, A.error) end
    finalize(job_id, status, fields, now, A.result_ttl_ms,
      {waiter = job, line = A.batch_line, record = record, counted = true})
    ended = not job.batch
  end
else
  if #record > 0 then redis.call('HSET', K_JOB .. job_id, unpack(record)) end
  if job.status == S_CANCELLED then
    end_cancelled_run(job_id, A.result_ttl_ms)
    status = S_CANCELLED
  end
end

local opened = false
do
  if A.error_code == E_BACKEND_ERROR or A.error_code == E_TIMEOUT then
    local in_row = redis.call('HINCRBY', K_BACKEND_FAILURES, backend, 1)
    local breaker = 'down:' .. backend
    if in_row >= A.breaker_threshold and is_up(redis.call('HGET', K_FLEET, breaker), now) then
      redis.call('HSET', K_FLEET, breaker, now + A.breaker_cooldown_ms)
      redis.call('HINCRBY', K_STATS, 'breaker_opened', 1)
      opened = true
    end
  elseif status ~= S_CANCELLED then
    redis.call('HSET', K_BACKEND_FAILURES, backend, 0)
  end
end
-- The fleet's moving means (K_MODEL_STATS): a job's cost (the provisional charge of
-- the scheduler) for whatever was served, and a success's time, the fleet's and its
-- model's (wait estimates).
local function ewma(mean, value)
  mean = tonumber(mean)
  return tostring(mean and (mean + A.ewma_weight * (value - mean)) or value)
end
local costed, timed = served > 0 or A.duration_ms > 0, status == S_SUCCEEDED
-- a job's service time, without a model load (a load is weighed apart: lib/schedule.lua)
local service_ms = math.max(0, A.duration_ms - A.model_load_ms)
if costed or timed then
  local model = job.model or ''
  local means = redis.call('HMGET', K_MODEL_STATS, MEAN_COST, MEAN_JOB_MS, model)
  local update = {}
  if costed then
    table.insert(update, MEAN_COST)
    table.insert(update, ewma(means[1], A.input_tokens + 2 * A.output_tokens))
  end
  if timed then
    table.insert(update, MEAN_JOB_MS)
    table.insert(update, ewma(means[2], service_ms))
    table.insert(update, model)
    table.insert(update, ewma(means[3], service_ms))
  end
  redis.call('HSET', K_MODEL_STATS, unpack(update))
end
return reply(status, opened)
