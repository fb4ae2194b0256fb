-- Shared by every gpugate script. shared/scripts.py puts before it the binding of the key
-- names, `local K_JOB = KEYS[1]` and so on: every script gets the same KEYS, the names of
-- shared/keys.py (fixed keys, and the prefixes of per-job, per-owner, per-backend keys).
-- The job record's fields and lifecycle are the table of shared/jobs.py.

-- The time in whole ms, and exact to the microsecond (a fraction of a ms): scripts run one
-- at a time on a Redis, so no two of them see the same microsecond.
local function clock_ms()
  local t = redis.call('TIME')
  local whole = tonumber(t[1]) * 1000
  local us = tonumber(t[2])
  return whole + math.floor(us / 1000), whole + us / 1000
end

local function now_ms()
  return (clock_ms())
end

local function run_of(job_id, attempt)
  return job_id .. '.' .. attempt
end

local function split_run(run_id)
  local job_id, attempt = string.match(run_id, '^(.*)%.(%d+)$')
  return job_id, tonumber(attempt)
end

local function error_json(code, message)
  return cjson.encode({code = code, message = message})
end

-- Token bucket: its level after refill at `now` (a missing bucket is full). A bucket may
-- be below zero (the tpm bucket, charged after the fact).
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

local function full_in_ms(tokens, rate_per_ms, burst)
  return math.ceil((burst - tokens) / rate_per_ms)
end

local function live_workers(now, stale_ms)
  return redis.call('ZCOUNT', K_WORKERS, now - stale_ms, '+inf')
end

-- The fleet as passed in ARGV from index `first` on: name, configured cap, kind, name, ...
local function read_backends(first)
  local backends = {}
  for i = first, #ARGV, 3 do
    local name = ARGV[i]
    local b = {name = name, kind = ARGV[i + 2]}
    b.cap = tonumber(redis.call('GET', K_BACKEND_CAP .. name)) or tonumber(ARGV[i + 1])
    b.running = redis.call('ZCARD', K_BACKEND_RUNNING .. name)
    b.up = redis.call('EXISTS', K_BACKEND_DOWN .. name) == 0
    b.any_model = redis.call('EXISTS', K_BACKEND_MODELS .. name) == 0
    b.free = math.max(0, b.cap - b.running)
    table.insert(backends, b)
  end
  return backends
end

local function serves(b, model)
  return b.any_model or redis.call('SISMEMBER', K_BACKEND_MODELS .. b.name, model) == 1
end

-- Whether `b` can run a job of `endpoint`: an `openai` backend runs only OpenAI's paths.
local function runs_endpoint(b, endpoint)
  return b.kind ~= 'openai' or OPENAI_PATHS[endpoint] == true
end

-- One run of a job on arq: payload in arq's JSON job format {t,f,a,k,et}.
local function arq_enqueue(job_id, attempt, score, now, expires_ms)
  local run_id = run_of(job_id, attempt)
  local payload = string.format('{"t":1,"f":"%s","a":["%s",%d],"k":{},"et":%d}',
    K_ARQ_FUNCTION, job_id, attempt, now)
  redis.call('SET', K_ARQ_JOB .. run_id, payload, 'PX', expires_ms)
  redis.call('ZADD', K_ARQ_QUEUE, score, run_id)
end

-- Remove a run from arq entirely (it ended, was cancelled, or its worker died).
local function arq_forget(run_id)
  redis.call('ZREM', K_ARQ_QUEUE, run_id)
  redis.call('DEL', K_ARQ_JOB .. run_id, K_ARQ_IN_PROGRESS .. run_id, K_ARQ_RETRY .. run_id)
end

-- A histogram observation: one count in the value's own bucket (the smallest bound it
-- is under), the total count and the sum; /metrics adds the buckets up (api/metrics.py).
local function observe(name, value, bounds)
  local key = K_HISTOGRAM .. name
  local bucket = '+Inf'
  for _, le in ipairs(bounds) do
    if value <= le then bucket = tostring(le); break end
  end
  redis.call('HINCRBY', key, bucket, 1)
  redis.call('HINCRBYFLOAT', key, 'sum', value)
end

local WAKE_MAX = 16

-- Wake one idle worker (BLPOP on K_WAKE); the list stays short when no worker is idle.
local function wake_one()
  if redis.call('LLEN', K_WAKE) < WAKE_MAX then redis.call('LPUSH', K_WAKE, 1) end
end

-- Fair share (VTC): the floor a key that starts waiting is lifted to, so that idle time
-- earns no credit: the lowest counter among the keys with jobs waiting, else the highest
-- counter served so far.
local function fair_share_floor()
  local lowest = redis.call('ZRANGE', K_BACKLOG, 0, 0, 'WITHSCORES')
  if lowest[2] then return tonumber(lowest[2]) end
  return tonumber(redis.call('HGET', K_STATS, 'vtc_floor')) or 0
end

-- Add a queued job to the waiting sets: the fleet's backlog, its owner's queue, and the
-- owner to the fair-share backlog (lifted, if it had nothing waiting). `owner_queued`: how
-- many jobs the owner has waiting, when the caller read it already.
local function enqueue_waiting(job_id, owner, score, model, priority, owner_queued)
  local oq = K_OWNER_QUEUE .. owner
  if (owner_queued or redis.call('ZCARD', oq)) == 0 then
    local counter = tonumber(redis.call('ZSCORE', K_VTC, owner)) or 0
    counter = math.max(counter, fair_share_floor())
    redis.call('ZADD', K_VTC, counter, owner)
    redis.call('ZREM', K_VTC_IDLE, owner)
    redis.call('ZADD', K_BACKLOG, counter, owner)
    redis.call('HSET', K_OWNER_PRIORITY, owner, priority)
  end
  redis.call('ZADD', oq, score, job_id)
  redis.call('ZADD', K_QUEUED, score, job_id)
  redis.call('HINCRBY', K_WAITING_MODELS, model, 1)
end

-- Take a job out of the waiting sets (it starts, is cancelled, or expires). An owner left
-- with nothing waiting is idle from `now`: its counter is forgotten once it has been idle
-- for the fair-share memory (heartbeat.lua), unless it waits again first.
local function leave_waiting(job_id, owner, model, now)
  local oq = K_OWNER_QUEUE .. owner
  if redis.call('ZREM', oq, job_id) == 1 then
    if redis.call('HINCRBY', K_WAITING_MODELS, model, -1) <= 0 then
      redis.call('HDEL', K_WAITING_MODELS, model)
    end
  end
  redis.call('ZREM', K_QUEUED, job_id)
  redis.call('ZREM', K_DEADLINES, job_id)
  if redis.call('ZCARD', oq) == 0 then
    redis.call('ZREM', K_BACKLOG, owner)
    redis.call('HDEL', K_OWNER_PRIORITY, owner)
    redis.call('ZADD', K_VTC_IDLE, now, owner)
  end
end

-- Grow an owner's fair-share counter (in the backlog too, while it waits there; else its
-- idle time starts again at `now`, so a counter charged at a run's end is forgotten too).
local function charge(owner, amount, now)
  if amount == 0 then return end
  redis.call('ZINCRBY', K_VTC, amount, owner)
  if not redis.call('ZADD', K_BACKLOG, 'XX', 'INCR', amount, owner) then
    redis.call('ZADD', K_VTC_IDLE, now, owner)
  end
end

-- A run gives its GPU slot back; `wake`: an idle worker should take it (the run's own
-- worker asks for work itself once it ends, unless it is stopping).
local function free_run(run_id, backend, wake)
  redis.call('ZREM', K_LEASES, run_id)
  local removed = redis.call('ZREM', K_RUNNING, run_id)
  if backend and backend ~= '' then redis.call('ZREM', K_BACKEND_RUNNING .. backend, run_id) end
  if wake and removed == 1 and redis.call('ZCARD', K_QUEUED) > 0 then wake_one() end
  return removed
end

-- The job's fields as a table (only those asked for).
local function read_job(job_id, ...)
  local names = {...}
  local values = redis.call('HMGET', K_JOB .. job_id, unpack(names))
  local job = {}
  for i, name in ipairs(names) do job[name] = values[i] end
  return job
end

-- A job's `end` event, on its stream; and for a synchronous call that waits for its end
-- alone (no stream), on the inbox of the API process that waits (api/inbox.py): one
-- XREAD there serves all the calls the process has waiting; its reader trims what it has
-- read, so nothing here caps the inbox (an end must never be trimmed before it is read).
local function post_end(job_id, event, inbox, ttl_ms)
  local ek = K_EVENTS .. job_id
  redis.call('XADD', ek, '*', unpack(event))
  redis.call('PEXPIRE', ek, ttl_ms)
  if inbox and inbox ~= '' then
    local ik = K_INBOX .. inbox
    redis.call('XADD', ik, '*', 'job', job_id, unpack(event))
    redis.call('PEXPIRE', ik, ttl_ms)
  end
end

-- End a job: final fields, the `end` event for waiters (with the outcome itself for a
-- synchronous caller, so it needs no second read), the record kept for result_ttl.
-- `waiter`: the job's `sync` and `inbox` fields, when the caller read them already.
local function finalize(job_id, status, fields, now, result_ttl_ms, waiter)
  local jk = K_JOB .. job_id
  redis.call('HSET', jk, 'status', status, 'finished_at', now, unpack(fields))
  redis.call('PEXPIRE', jk, result_ttl_ms)
  local event = {'type', 'end', 'status', status}
  waiter = waiter or read_job(job_id, 'sync', 'inbox')
  if waiter.sync == '1' then
    for i = 1, #fields do table.insert(event, fields[i]) end
  end
  post_end(job_id, event, waiter.inbox, result_ttl_ms)
  redis.call('HINCRBY', K_STATS, 'jobs_' .. status, 1)
end

-- The `end` event of a job cancelled while it ran, once its run has stopped.
local function end_cancelled_run(job_id, result_ttl_ms)
  local inbox = redis.call('HGET', K_JOB .. job_id, 'inbox')
  post_end(job_id, {'type', 'end', 'status', 'cancelled'}, inbox, result_ttl_ms)
end

-- Cancel a job that is still queued: it never starts.
local function cancel_queued(job_id, owner, model, attempt, code, message, now, result_ttl_ms)
  leave_waiting(job_id, owner, model, now)
  arq_forget(run_of(job_id, attempt))
  finalize(job_id, 'cancelled', {'error', error_json(code, message)}, now, result_ttl_ms)
  redis.call('PUBLISH', K_CANCEL_CHANNEL, job_id)
end

-- Queue a job again as its next attempt, keeping its place (a dead worker, a backend
-- that failed before any byte was relayed).
local function requeue(job_id, job, now, record_ttl_ms, extra)
  local jk = K_JOB .. job_id
  local attempt = tonumber(job.attempt) + 1
  redis.call('HSET', jk, 'status', 'queued', 'attempt', attempt, 'worker', '', 'backend', '',
    'started_at', '', unpack(extra))
  redis.call('PEXPIRE', jk, record_ttl_ms)
  enqueue_waiting(job_id, job.owner, tonumber(job.score), job.model, tonumber(job.priority))
  arq_enqueue(job_id, attempt, tonumber(job.score), now, record_ttl_ms)
  redis.call('HINCRBY', K_STATS, 'jobs_requeued', 1)
  wake_one()
end

