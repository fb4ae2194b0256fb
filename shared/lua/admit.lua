-- The admission decision and the enqueue, in one atomic step.
-- Order: idempotency replay, a live worker, the circuit breaker (Ollama down), the key's
-- token bucket, the backlog (global, then the key's own quota). Only admission spends the
-- key's token.
-- ARGV: 1 owner, 2 rate per ms, 3 burst, 4 max queue depth, 5 max queued for this key,
--       6 priority boost ms, 7 job id, 8 endpoint, 9 body (JSON text), 10 stream 0|1,
--       11 sync 0|1, 12 deadline ms from now (0: none), 13 owner name,
--       14 idempotency key ('' none), 15 body digest, 16 result ttl ms, 17 worker stale ms,
--       18 default cap, 19 record ttl ms
-- -> {outcome, job id, tokens left, ms until full, ms until next token,
--     queue depth, running, cap, mean job ms ('' unknown), rank of the job or of the key's
--     first queued job}
local owner, rate, burst = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local max_depth, max_mine, boost = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local job_id, idem, digest = ARGV[7], ARGV[14], ARGV[15]
local result_ttl, stale, default_cap = tonumber(ARGV[16]), tonumber(ARGV[17]), tonumber(ARGV[18])
local record_ttl = tonumber(ARGV[19])
local now = now_ms()

local tokens = bucket_level(K_BUCKET .. owner, rate, burst, now)
local function answer(outcome, id, rank)
  if outcome ~= 'admitted' and outcome ~= 'existing' and outcome ~= 'conflict' then
    redis.call('HINCRBY', K_STATS, 'rejected_' .. outcome, 1)
  end
  local mean = redis.call('HGET', K_STATS, 'mean_job_ms') or ''
  return {outcome, id, tostring(tokens), full_at_ms(tokens, rate, burst, now) - now,
    math.max(0, math.ceil((1 - tokens) / rate)), redis.call('ZCARD', K_QUEUED),
    redis.call('ZCARD', K_RUNNING), current_cap(default_cap), mean, rank}
end

if idem ~= '' then
  local prior = redis.call('GET', idem)
  if prior then
    local prior_id, prior_digest = string.match(prior, '^([^ ]*) (.*)$')
    if prior_digest ~= digest then return answer('conflict', prior_id, -1) end
    if redis.call('EXISTS', K_JOB .. prior_id) == 1 then
      return answer('existing', prior_id, redis.call('ZRANK', K_QUEUED, prior_id) or -1)
    end
  end
end
if live_workers(now, stale) == 0 then return answer('no_worker', '', -1) end
if redis.call('EXISTS', K_BREAKER) == 1 then return answer('backend_down', '', -1) end
if tokens < 1 then return answer('rate_limited', '', -1) end
if redis.call('ZCARD', K_QUEUED) >= max_depth then return answer('queue_full', '', -1) end
local mine = redis.call('SMEMBERS', K_QUEUED_BY .. owner)
if #mine >= max_mine then
  local first = -1
  for _, id in ipairs(mine) do
    local r = redis.call('ZRANK', K_QUEUED, id)
    if r and (first < 0 or r < first) then first = r end
  end
  return answer('queue_full_key', '', first)
end

tokens = tokens - 1
bucket_store(K_BUCKET .. owner, tokens, rate, burst, now)
local score = now - boost
local deadline = tonumber(ARGV[12])
local jk = K_JOB .. job_id
redis.call('HSET', jk, 'id', job_id, 'owner', owner, 'owner_name', ARGV[13],
  'endpoint', ARGV[8], 'body', ARGV[9], 'stream', ARGV[10], 'sync', ARGV[11],
  'status', 'queued', 'created_at', now, 'score', score, 'attempt', 1, 'runs', 0,
  'deadline_at', deadline > 0 and (now + deadline) or '')
redis.call('PEXPIRE', jk, record_ttl)
if deadline > 0 then redis.call('ZADD', K_DEADLINES, now + deadline, job_id) end
redis.call('ZADD', K_QUEUED, score, job_id)
redis.call('SADD', K_QUEUED_BY .. owner, job_id)
arq_enqueue(job_id, 1, score, now, record_ttl)
if idem ~= '' then redis.call('SET', idem, job_id .. ' ' .. digest, 'PX', result_ttl) end
redis.call('HINCRBY', K_STATS, 'jobs_admitted', 1)
redis.call('PUBLISH', K_WAKE_CHANNEL, job_id)
return answer('admitted', job_id, redis.call('ZRANK', K_QUEUED, job_id))
