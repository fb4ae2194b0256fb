-- Waiting and fair share (VTC): the owners' queues, the backlog ordered by fair-share
-- counter, the counters themselves.

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
-- (Its idle mark, K_VTC_IDLE, stays: heartbeat.lua forgets no counter of an owner that
-- waits, and leave_waiting marks it again when it stops waiting.)
local function enqueue_waiting(job_id, owner, score, model, priority, owner_queued)
  local oq = K_OWNER_QUEUE .. owner
  if (owner_queued or redis.call('ZCARD', oq)) == 0 then
    local counter = tonumber(redis.call('ZSCORE', K_VTC, owner)) or 0
    local floor = fair_share_floor()
    if floor > counter then
      counter = floor
      redis.call('ZADD', K_VTC, counter, owner)
    end
    redis.call('ZADD', K_BACKLOG, counter, owner)
    -- the default tier's priority (0) is the absence of an entry
    if priority ~= 0 then redis.call('HSET', K_OWNER_PRIORITY, owner, priority) end
  end
  redis.call('ZADD', oq, score, job_id)
  redis.call('ZADD', K_QUEUED, score, job_id)
  redis.call('HINCRBY', K_WAITING_MODELS, model, 1)
end

-- Take a job out of the waiting sets (it starts, is cancelled, or expires). An owner left
-- with nothing waiting is idle from `now`: its counter is forgotten once it has been idle
-- for the fair-share memory (heartbeat.lua), unless it waits again first. `untimed`: the
-- caller knows the job has no deadline (admit.lua's K_DEADLINES entry); `priority`: the
-- owner's, when the caller read it (0: no entry to delete); `alone`: the caller knows the
-- job was the owner's only one waiting. True when the owner has nothing left waiting.
local function leave_waiting(job_id, owner, model, now, untimed, priority, alone)
  local oq = K_OWNER_QUEUE .. owner
  if redis.call('ZREM', oq, job_id) == 1 then
    if redis.call('HINCRBY', K_WAITING_MODELS, model, -1) <= 0 then
      redis.call('HDEL', K_WAITING_MODELS, model)
    end
  end
  redis.call('ZREM', K_QUEUED, job_id)
  if not untimed then redis.call('ZREM', K_DEADLINES, job_id) end
  if alone or redis.call('ZCARD', oq) == 0 then
    redis.call('ZREM', K_BACKLOG, owner)
    if priority ~= 0 then redis.call('HDEL', K_OWNER_PRIORITY, owner) end
    redis.call('ZADD', K_VTC_IDLE, now, owner)
    return true
  end
  return false
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

-- Batch lines have a fair-share counter of their own, among the owners with batch lines
-- waiting (the scheduler's batch band): an owner that joins starts level with the lowest.
local function charge_batch(owner, amount)
  if amount ~= 0 then redis.call('ZADD', K_BATCH_BACKLOG, 'XX', 'INCR', amount, owner) end
end

local function join_batch_band(owner)
  if redis.call('ZSCORE', K_BATCH_BACKLOG, owner) then return end
  local lowest = redis.call('ZRANGE', K_BATCH_BACKLOG, 0, 0, 'WITHSCORES')
  redis.call('ZADD', K_BATCH_BACKLOG, tonumber(lowest[2]) or 0, owner)
end
