-- Shared by every gpugate script; shared/scripts.py prepends the key names (K_*).
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Token bucket: level after refill at `now` (a missing bucket is full).
local function bucket_level(key, rate_per_ms, burst, now)
  local v = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(v[1])
  if tokens == nil then return burst end
  return math.min(burst, tokens + math.max(0, now - tonumber(v[2])) * rate_per_ms)
end

local function bucket_store(key, tokens, rate_per_ms, burst, now)
  redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', now)
  -- an idle bucket is full again after this long; then it is the same as no bucket
  redis.call('PEXPIRE', key, math.ceil((burst - tokens) / rate_per_ms) + 1000)
end

local function full_at_ms(tokens, rate_per_ms, burst, now)
  return now + math.ceil((burst - tokens) / rate_per_ms)
end

local function live_workers(now, stale_ms)
  return redis.call('ZCOUNT', K_WORKERS, now - stale_ms, '+inf')
end

local function current_cap(default_cap)
  return tonumber(redis.call('GET', K_CAP)) or default_cap
end

-- One run of a job on arq: payload in arq's JSON job format {t,f,a,k,et}.
local function arq_enqueue(job_id, attempt, score, now, expires_ms)
  local run_id = job_id .. '.' .. attempt
  local payload = string.format('{"t":1,"f":"%s","a":["%s",%d],"k":{},"et":%d}',
    K_ARQ_FUNCTION, job_id, attempt, now)
  redis.call('SET', K_ARQ_JOB .. run_id, payload, 'PX', expires_ms)
  redis.call('ZADD', K_ARQ_QUEUE, score, run_id)
end

-- Remove a run from arq entirely (it was cancelled, or its worker died).
local function arq_forget(run_id)
  redis.call('ZREM', K_ARQ_QUEUE, run_id)
  redis.call('DEL', K_ARQ_JOB .. run_id, K_ARQ_IN_PROGRESS .. run_id, K_ARQ_RETRY .. run_id)
end

local function split_run(run_id)
  local job_id, attempt = string.match(run_id, '^(.*)%.(%d+)$')
  return job_id, tonumber(attempt)
end

local function observe(name, value, bounds)
  local key = K_HISTOGRAM .. name
  for _, le in ipairs(bounds) do
    if value <= le then redis.call('HINCRBY', key, tostring(le), 1) end
  end
  redis.call('HINCRBY', key, '+Inf', 1)
  redis.call('HINCRBYFLOAT', key, 'sum', value)
end

local QUEUE_WAIT_BOUNDS = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}
local JOB_DURATION_BOUNDS = {0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600}

-- Leave the backlog: no longer queued, no longer counted against its key.
local function unqueue(job_id, owner)
  redis.call('ZREM', K_QUEUED, job_id)
  redis.call('ZREM', K_DEADLINES, job_id)
  redis.call('SREM', K_QUEUED_BY .. owner, job_id)
end

-- End a job: final fields, the `end` event for waiters, the record kept for result_ttl.
local function finalize(job_id, status, fields, now, result_ttl_ms)
  local jk = K_JOB .. job_id
  redis.call('HSET', jk, 'status', status, 'finished_at', now, unpack(fields))
  redis.call('PEXPIRE', jk, result_ttl_ms)
  local ek = K_EVENTS .. job_id
  redis.call('XADD', ek, '*', 'type', 'end', 'status', status)
  redis.call('PEXPIRE', ek, result_ttl_ms)
  redis.call('HINCRBY', K_STATS, 'jobs_' .. status, 1)
end

local function error_json(code, message)
  return cjson.encode({code = code, message = message})
end

-- A queued job whose deadline passed: it never starts.
local function expire_queued(job_id, now, result_ttl_ms)
  local job = redis.call('HMGET', K_JOB .. job_id, 'status', 'owner', 'attempt')
  if job[1] ~= 'queued' then
    redis.call('ZREM', K_DEADLINES, job_id)
    return false
  end
  local run_id = job_id .. '.' .. job[3]
  unqueue(job_id, job[2])
  redis.call('ZREM', K_CLAIMS, run_id)
  redis.call('ZREM', K_LEASES, run_id)
  if redis.call('EXISTS', K_ARQ_IN_PROGRESS .. run_id) == 0 then arq_forget(run_id) end
  finalize(job_id, 'cancelled', {'error', error_json('deadline_exceeded',
    'The job was still queued when its deadline passed.')}, now, result_ttl_ms)
  redis.call('PUBLISH', K_CANCEL_CHANNEL, job_id)
  return true
end
