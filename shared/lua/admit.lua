-- uses: clock, buckets, fleet, fairshare, job
-- The admission decision and the enqueue, in one atomic step (shared/scripts.py `admit`).
-- Order: idempotency replay, a live worker, a backend up, the key's request bucket, its
-- token (tpm) bucket, the backlog (the fleet's, then the key's own quota). Only an
-- admission spends: one request token, and the tokens the request names.
local A = cjson.decode(ARGV[1])
local BODY = ARGV[2]  -- the request body, as sent (not JSON-escaped into ARGV[1])
local now, now_exact = clock_ms()
local owner = A.owner
local bucket_key = K_BUCKET .. owner
local tokens = bucket_level(bucket_key, A.rate_per_ms, A.burst, now)
local tpm_key = K_TOKEN_BUCKET .. owner
local budget = nil
if A.tpm_per_ms > 0 then budget = bucket_level(tpm_key, A.tpm_per_ms, A.tpm_burst, now) end
-- The backlog's facts, for a wait estimate: only what needs one reads them (a queue_full
-- Retry-After, the 202 of an async job), so that a rate-limit refusal stays cheap.
local ESTIMATED = {queue_full = true, queue_full_key = true, admitted = not A.sync, existing = true}

local function answer(outcome, job_id, rank, extra)
  if outcome ~= 'admitted' and outcome ~= 'existing' and outcome ~= 'conflict' then
    redis.call('HINCRBY', K_STATS, 'rejected_' .. outcome, 1)
  end
  local out = {
    outcome = outcome, job_id = job_id, rank = rank, now_ms = now,
    tokens = tokens, full_in_ms = full_in_ms(tokens, A.rate_per_ms, A.burst),
    next_token_ms = math.max(0, math.ceil((1 - tokens) / A.rate_per_ms)),
  }
  if ESTIMATED[outcome] then
    local cap, running, serving_cap = 0, 0, 0
    for _, b in ipairs(read_backends(ARGV, 3, now, fleet_state())) do
      cap = cap + b.cap
      running = running + b.running
      if b.up and serves(b, A.model) and runs_endpoint(b, A.endpoint) then
        serving_cap = serving_cap + b.cap
      end
    end
    local means = redis.call('HMGET', K_MODEL_STATS, A.model, MEAN_JOB_MS)
    out.depth, out.running, out.cap = redis.call('ZCARD', K_QUEUED), running, cap
    out.serving_cap, out.mean_job_ms = serving_cap, tonumber(means[1] or means[2])
  end
  if budget ~= nil then
    out.budget = budget
    out.budget_full_in_ms = full_in_ms(budget, A.tpm_per_ms, A.tpm_burst)
    -- until it is above zero again, and holds what the request names
    out.budget_ready_in_ms = math.max(0, math.ceil((A.reserve_tokens - budget) / A.tpm_per_ms) + 1)
  end
  if extra then for k, v in pairs(extra) do out[k] = v end end
  return cjson.encode(out)
end

if A.idempotency_key ~= '' then
  local prior = redis.call('GET', A.idempotency_key)
  if prior then
    local prior_id, prior_digest = string.match(prior, '^([^ ]*) (.*)$')
    if prior_digest ~= A.digest then return answer('conflict', prior_id, -1) end
    local job = read_job(prior_id, 'status', 'created_at')
    if job.status then
      return answer('existing', prior_id, redis.call('ZRANK', K_QUEUED, prior_id) or -1,
        {status = job.status, created_at_ms = tonumber(job.created_at)})
    end
  end
end
if live_workers(now, A.worker_stale_ms) == 0 then return answer('no_worker', '', -1) end
local breakers = {}
for i = 3, #ARGV, 3 do table.insert(breakers, 'down:' .. ARGV[i]) end
local any_up = false
for _, down_until in ipairs(redis.call('HMGET', K_FLEET, unpack(breakers))) do
  any_up = any_up or is_up(down_until, now)
end
if not any_up then return answer('backend_down', '', -1) end
-- the key's token budget for the period (shared/budget.py): spent up, or short of what
-- the request names, is budget_exhausted
local budget_key = nil
if (A.budget_tokens or 0) > 0 then
  budget_key = K_BUDGET .. owner .. ':' .. A.budget_period
  local used = tonumber(redis.call('GET', budget_key)) or 0
  if used >= A.budget_tokens or used + (A.budget_reserve or 0) > A.budget_tokens then
    return answer('budget_exhausted', '', -1, {budget_used = used})
  end
end
if tokens < 1 then return answer('rate_limit_exceeded', '', -1) end
if budget ~= nil and (budget <= 0 or A.reserve_tokens > budget) then
  return answer('token_limit_exceeded', '', -1)
end
if redis.call('ZCARD', K_QUEUED) >= A.max_depth then return answer('queue_full', '', -1) end
local oq = K_OWNER_QUEUE .. owner
local owner_queued = redis.call('ZCARD', oq)
if owner_queued >= A.max_queued then
  local first = redis.call('ZRANGE', oq, 0, 0)[1]
  return answer('queue_full_key', '', first and redis.call('ZRANK', K_QUEUED, first) or -1)
end

tokens = tokens - 1
bucket_store(bucket_key, tokens, A.rate_per_ms, A.burst, now)
if budget ~= nil then
  budget = budget - A.reserve_tokens
  bucket_store(tpm_key, budget, A.tpm_per_ms, A.tpm_burst, now)
end
local job_id = A.job_id
local score = now_exact - A.boost_ms  -- FIFO, even within one ms
local deadline_at = A.deadline_ms > 0 and (now + A.deadline_ms) or nil
local record = {'id', job_id, 'owner', owner, 'owner_name', A.owner_name,
  'usage_name', A.usage_name, 'endpoint', A.endpoint, 'model', A.model, 'body', BODY,
  'stream', A.stream and 1 or 0, 'sync', A.sync and 1 or 0,
  'created_at', now, 'score', score, 'priority', A.priority, 'weight', A.weight,
  'attempt', 1, 'runs', 0, 'reserved_tokens', A.reserve_tokens,
  'tpm_rate', A.tpm_per_ms, 'tpm_burst', A.tpm_burst,
  'deadline_at', deadline_at or '', 'inbox', A.inbox}
-- the fields only some jobs have, in the same HSET
local function also(field, value)
  record[#record + 1] = field
  record[#record + 1] = value
end
if A.traceparent then also('traceparent', A.traceparent) end
if A.session then also('session', A.session) end
if A.hook then also('hook', A.hook) end  -- its key's webhook
-- a known key's limits: its budget reservation (settled by finish.lua), the record the
-- scheduler reads its live max_running from, the tier's max_running (lib/schedule.lua)
if budget_key then
  redis.call('INCRBY', budget_key, A.budget_reserve or 0)
  redis.call('PEXPIRE', budget_key, A.budget_ttl_ms)
  also('budget_key', budget_key)
  also('budget_reserved', A.budget_reserve or 0)
end
if (A.max_running or 0) > 0 then also('max_running', A.max_running) end
if (A.key_record or '') ~= '' then
  also('key_record', A.key_record)
  redis.call('HSET', K_APIKEY_USED, A.key_record, now)
end
local deadline = deadline_at
if A.hold_ms > 0 then
  -- not dispatched before replicas have it (release.lua); gone if nobody releases it
  also('held', 1)
  deadline = math.min(deadline or math.huge, now + A.hold_ms)
end
set_status(job_id, S_QUEUED, unpack(record))
redis.call('PEXPIRE', K_JOB .. job_id, A.record_ttl_ms)
if deadline then redis.call('ZADD', K_DEADLINES, deadline, job_id) end
enqueue_waiting(job_id, owner, score, A.model, A.priority, owner_queued)
if A.idempotency_key ~= '' then
  redis.call('SET', A.idempotency_key, job_id .. ' ' .. A.digest, 'PX', A.result_ttl_ms)
end
redis.call('HINCRBY', K_STATS, 'jobs_admitted', 1)
redis.call('HINCRBY', K_USAGE, A.usage_name .. '|requests', 1)
if A.hold_ms == 0 then wake_one() end
-- a synchronous call shows no queue position (only the 202 of an async job does)
local rank = A.sync and -1 or redis.call('ZRANK', K_QUEUED, job_id)
return answer('admitted', job_id, rank, {status = S_QUEUED, created_at_ms = now})
