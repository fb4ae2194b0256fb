-- Token buckets (a key's requests, its tpm tokens, the /health limit).

-- Token bucket: its level after refill at `now` (a missing bucket is full). A bucket may
-- be below zero (the tpm bucket, charged after the fact).
-- A bucket is a string "<tokens> <ms>" (its level, and when it was stored): one GET, one SET.
local function bucket_level(key, rate_per_ms, burst, now)
  local tokens, ts = string.match(redis.call('GET', key) or '', '^(%S+) (%d+)$')
  if tokens == nil then return burst end
  return math.min(burst, tonumber(tokens) + math.max(0, now - tonumber(ts)) * rate_per_ms)
end

local function bucket_store(key, tokens, rate_per_ms, burst, now)
  -- an idle bucket is full again after this long; then it is the same as no bucket
  redis.call('SET', key, string.format('%.17g %d', tokens, now),
    'PX', math.ceil((burst - tokens) / rate_per_ms) + 1000)
end

local function full_in_ms(tokens, rate_per_ms, burst)
  return math.ceil((burst - tokens) / rate_per_ms)
end
