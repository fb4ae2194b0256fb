-- Take one token from a bucket (the /health and metadata limits).
-- ARGV: bucket key, rate per ms, burst
-- -> {allowed 0|1, whole tokens left, ms until full, ms until the next token}
local key, rate, burst = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local tokens = bucket_level(key, rate, burst, now)
if tokens < 1 then
  return {0, 0, full_at_ms(tokens, rate, burst, now) - now, math.ceil((1 - tokens) / rate)}
end
tokens = tokens - 1
bucket_store(key, tokens, rate, burst, now)
return {1, math.floor(tokens), full_at_ms(tokens, rate, burst, now) - now, 0}
