-- Token buckets (a key's requests, its tpm tokens, the /health limit).

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
