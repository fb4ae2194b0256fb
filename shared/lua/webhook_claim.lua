-- uses: clock
-- Claim up to `limit` webhook deliveries that are due, for one attempt each by `worker`
-- (shared/scripts.py `claim_webhooks`, worker/webhooks.py). A claimed delivery moves
-- `lease_ms` ahead in the due set: no other worker sends it meanwhile, and if this one dies
-- it is due again then. A delivery that is no longer pending leaves the due set.
local A = cjson.decode(ARGV[1])
local now = now_ms()
local claimed = {}
local due = redis.call('ZRANGEBYSCORE', K_WEBHOOK_DUE, '-inf', now, 'LIMIT', 0, A.limit)
for _, id in ipairs(due) do
  local wk = K_WEBHOOK .. id
  local h = redis.call('HMGET', wk, 'state', 'key', 'body', 'attempts', 'created_at')
  if h[1] ~= 'pending' then
    redis.call('ZREM', K_WEBHOOK_DUE, id)
  else
    local claim = A.worker .. '/' .. redis.call('HINCRBY', wk, 'claims', 1)
    redis.call('HSET', wk, 'claim', claim)
    redis.call('ZADD', K_WEBHOOK_DUE, now + A.lease_ms, id)
    -- the key's listing outlives its last pending delivery by the time a failed one is kept
    redis.call('PEXPIRE', K_WEBHOOKS_OF .. h[2], A.listing_keep_ms)
    claimed[#claimed + 1] = {id = id, key = h[2], body = h[3], claim = claim,
      attempts = tonumber(h[4]) or 0, created_at = tonumber(h[5]) or now}
  end
end
return cjson.encode({claimed = claimed})
