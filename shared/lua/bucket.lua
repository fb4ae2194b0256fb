-- uses: clock, buckets
-- Take one token from a bucket: the /health and metadata limits (shared/scripts.py
-- `take_token`).
local A = cjson.decode(ARGV[1])
local key = K_BUCKET .. A.name
local now = now_ms()
local tokens = bucket_level(key, A.rate_per_ms, A.burst, now)
local allowed = tokens >= 1
if allowed then
  tokens = tokens - 1
  bucket_store(key, tokens, A.rate_per_ms, A.burst, now)
end
return cjson.encode({allowed = allowed, tokens = tokens,
  next_token_ms = math.max(0, math.ceil((1 - tokens) / A.rate_per_ms))})
