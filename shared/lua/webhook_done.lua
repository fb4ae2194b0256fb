-- uses: clock
-- Record one attempt of a webhook delivery (shared/scripts.py `webhook_done`), if the
-- claim it was made under is still the delivery's (else a later claim owns it: nothing).
-- `outcome`: delivered (a 2xx), retry (anything else), failed (nowhere to send it). A retry
-- is due after the backoff, from `base_ms` doubling, at most `max_ms`; one that would come
-- later than `retry_for_ms` after the event was created fails instead.
local A = cjson.decode(ARGV[1])
local wk = K_WEBHOOK .. A.id
local h = redis.call('HMGET', wk, 'claim', 'key', 'state', 'created_at')
if h[1] ~= A.claim or h[3] ~= 'pending' then return cjson.encode({state = 'stale'}) end
local now = now_ms()
local listing = K_WEBHOOKS_OF .. h[2]
local attempts = redis.call('HINCRBY', wk, 'attempts', 1)
redis.call('HSET', wk, 'last_status', A.status, 'last_error', A.error, 'last_attempt_at', now)
redis.call('HDEL', wk, 'claim')
local state, next_at = A.outcome, nil
if state == 'retry' then
  local delay = math.min(A.base_ms * 2 ^ math.min(attempts - 1, 40), A.max_ms)
  next_at = math.floor(now + delay)
  if next_at > (tonumber(h[4]) or now) + A.retry_for_ms then
    state, next_at = 'failed', nil
  else
    state = 'pending'
  end
end
if state == 'pending' then
  redis.call('HSET', wk, 'next_at', next_at)
  redis.call('ZADD', K_WEBHOOK_DUE, next_at, A.id)
else
  redis.call('ZREM', K_WEBHOOK_DUE, A.id)
  redis.call('HSET', wk, 'state', state, state .. '_at', now, 'next_at', '')
  if state == 'delivered' then
    redis.call('ZREM', listing, A.id)
    redis.call('PEXPIRE', wk, A.delivered_keep_ms)
  else
    redis.call('PEXPIRE', wk, A.failed_keep_ms)
  end
end
-- entries whose record has expired (failed ones kept their time) leave the listing
redis.call('ZREMRANGEBYSCORE', listing, '-inf', now - A.listing_keep_ms)
return cjson.encode({state = state, attempts = attempts, next_at = next_at})
