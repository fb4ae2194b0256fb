-- uses: clock, webhook, batch
-- One step of the batch loop (worker/batches.py, shared/scripts.py `batch_step`): a batch
-- whose window has passed starts ending as `expired`; an ending batch's lines that never
-- started go to the error file, at most `chunk` lines a step; a batch with nothing left
-- waiting or running ends (lib/batch.lua `batch_settle`). Replies how many batches are
-- still draining (the loop steps again at once while any has lines left).
local A = cjson.decode(ARGV[1])
local now = now_ms()
local left = A.chunk
local draining = 0
local due = redis.call('ZRANGEBYSCORE', K_BATCH_ACTIVE, '-inf', now, 'LIMIT', 0, 32)
for _, batch_id in ipairs(due) do
  local bk = K_BATCH .. batch_id
  local v = redis.call('HMGET', bk, 'status', 'ending', 'owner')
  local status, ending = v[1], v[2]
  if not status then
    redis.call('ZREM', K_BATCH_ACTIVE, batch_id)
  else
    if status == B_IN_PROGRESS then  -- its completion window has passed
      ending = 'expired'
      redis.call('HSET', bk, 'status', B_FINALIZING, 'ending', ending,
        'finalizing_at', math.floor(now / 1000))
      redis.call('ZREM', K_BATCH_OWNER .. v[3], batch_id)
      redis.call('ZADD', K_BATCH_ACTIVE, 0, batch_id)
    end
    if ending == 'expired' or ending == 'cancelled' then
      local code = ending == 'expired' and A.expired_code or A.cancelled_code
      local message = ending == 'expired'
        and 'The batch did not run this line within its completion window.'
        or 'The batch was cancelled before this line started.'
      local todo = tonumber(redis.call('HGET', bk, 'todo')) or 0
      local done = left > 0 and batch_drain(batch_id, ending, code, message, left)
      left = left - (todo - (tonumber(redis.call('HGET', bk, 'todo')) or 0))
      if not batch_settle(batch_id, now) and not done then draining = draining + 1 end
    end
  end
end
return cjson.encode({draining = draining})
