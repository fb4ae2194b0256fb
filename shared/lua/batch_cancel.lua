-- uses: clock, webhook, batch
-- Cancel a batch for its owner (shared/scripts.py `batch_cancel`): no new line starts;
-- the batch loop moves the lines that never started to the error file (batch_step.lua)
-- and the batch is `cancelled` once its running lines have ended.
local A = cjson.decode(ARGV[1])
local bk = K_BATCH .. A.batch_id
local v = redis.call('HMGET', bk, 'status', 'owner')
if not v[1] or v[2] ~= A.owner then return cjson.encode({status = ''}) end
if v[1] == B_IN_PROGRESS or v[1] == B_VALIDATING then
  local now = now_ms()
  redis.call('HSET', bk, 'status', B_CANCELLING, 'ending', 'cancelled',
    'cancelling_at', math.floor(now / 1000))
  redis.call('ZREM', K_BATCH_OWNER .. A.owner, A.batch_id)
  redis.call('ZADD', K_BATCH_ACTIVE, 0, A.batch_id)  -- the batch loop drains it next
  return cjson.encode({status = B_CANCELLING})
end
return cjson.encode({status = v[1]})
