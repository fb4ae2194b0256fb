-- The job's life: its record, its status (set_status is the only code that writes it),
-- its end event, its slot. The fields and statuses are the table of shared/jobs.py.
-- needs: clock, fleet, fairshare, webhook, batch

-- A run gives its GPU slot back; `wake`: an idle worker should take it (the run's own
-- worker asks for work itself once it ends, unless it is stopping).
local function free_run(run_id, backend, wake)
  local removed = redis.call('ZREM', K_LEASES, run_id)
  if backend and backend ~= '' then redis.call('ZREM', K_BACKEND_RUNNING .. backend, run_id) end
  if wake and removed == 1 and redis.call('ZCARD', K_QUEUED) > 0 then wake_one() end
  return removed
end

-- The one writer of a job's `status`: every move of the lifecycle (shared/jobs.py) is a
-- call here, with the other fields that move sets, in one HSET.
local function set_status(job_id, status, ...)
  redis.call('HSET', K_JOB .. job_id, 'status', status, ...)
end

-- The job's fields as a table (only those asked for).
local function read_job(job_id, ...)
  local names = {...}
  local values = redis.call('HMGET', K_JOB .. job_id, unpack(names))
  local job = {}
  for i, name in ipairs(names) do job[name] = values[i] end
  return job
end

-- A job's `end` event, on its stream; and for a synchronous call that waits for its end
-- alone (no stream), on the inbox of the API process that waits (api/inbox.py): one
-- XREAD there serves all the calls the process has waiting; its reader trims what it has
-- read, so nothing here caps the inbox (an end must never be trimmed before it is read).
local function post_end(job_id, event, inbox, ttl_ms)
  local ek = K_EVENTS .. job_id
  redis.call('XADD', ek, '*', unpack(event))
  redis.call('PEXPIRE', ek, ttl_ms)
  if inbox and inbox ~= '' then
    local ik = K_INBOX .. inbox
    redis.call('XADD', ik, '*', 'job', job_id, unpack(event))
    redis.call('PEXPIRE', ik, ttl_ms)
  end
end

-- End a job: final fields, the `end` event for waiters (with the outcome itself for a
-- synchronous caller, so it needs no second read), the record kept for result_ttl, its
-- key's webhook told, the end counted. `opts` (each optional): `waiter`, the job's `sync`,
-- `inbox`, `hook` and `batch` fields (and a batch line's `custom_id`) when the caller read
-- them already; `record`, more fields of the job set with the status (not told to the
-- waiter); `counted`, the caller counts the end itself (finish.lua: its worker's tally).
-- A batch line's end goes to its batch instead (lib/batch.lua): `opts.line` is what the
-- worker made of its answer.
local function finalize(job_id, status, fields, now, result_ttl_ms, opts)
  opts = opts or {}
  local waiter = opts.waiter or read_job(job_id, 'sync', 'inbox', 'hook', 'batch', 'custom_id')
  if waiter.batch then
    local error_text = nil
    for i = 1, #fields, 2 do
      if fields[i] == 'error' then error_text = fields[i + 1] end
    end
    batch_line_end(job_id, waiter, status, error_text, opts.line, now)
    return
  end
  local set = {'finished_at', now, unpack(fields)}
  for _, v in ipairs(opts.record or {}) do table.insert(set, v) end
  set_status(job_id, status, unpack(set))
  redis.call('PEXPIRE', K_JOB .. job_id, result_ttl_ms)
  local event = {'type', 'end', 'status', status}
  if waiter.sync == '1' then
    for i = 1, #fields do table.insert(event, fields[i]) end
  end
  post_end(job_id, event, waiter.inbox, result_ttl_ms)
  if not opts.counted then redis.call('HINCRBY', K_STATS, 'jobs_' .. status, 1) end
  emit_webhook(waiter.hook, 'job.' .. status, job_id, now)
end

-- The `end` event of a job cancelled while it ran, once its run has stopped.
local function end_cancelled_run(job_id, result_ttl_ms)
  local inbox = redis.call('HGET', K_JOB .. job_id, 'inbox')
  post_end(job_id, {'type', 'end', 'status', S_CANCELLED}, inbox, result_ttl_ms)
end

-- Cancel a job that runs: `cancelled` now, its holder told to close the backend call;
-- its end event follows once the run has stopped (finish.lua, or the reaper).
local function cancel_running(job_id, code, message, now, result_ttl_ms)
  set_status(job_id, S_CANCELLED, 'finished_at', now, 'error', error_json(code, message))
  redis.call('PEXPIRE', K_JOB .. job_id, result_ttl_ms)
  redis.call('HINCRBY', K_STATS, 'jobs_' .. S_CANCELLED, 1)
  redis.call('PUBLISH', K_CANCEL_CHANNEL, job_id)
  emit_webhook(redis.call('HGET', K_JOB .. job_id, 'hook'), 'job.' .. S_CANCELLED, job_id, now)
end

-- A budget reservation (admit.lua's) of a job that will never run, given back.
local function return_budget(job_id)
  local v = redis.call('HMGET', K_JOB .. job_id, 'budget_key', 'budget_reserved')
  local reserved = tonumber(v[2]) or 0
  if v[1] and reserved > 0 then
    if redis.call('EXISTS', v[1]) == 1 then redis.call('INCRBY', v[1], -reserved) end
    redis.call('HSET', K_JOB .. job_id, 'budget_reserved', 0)
  end
end

-- Cancel a job that is still queued: it never starts.
local function cancel_queued(job_id, owner, model, code, message, now, result_ttl_ms)
  return_budget(job_id)
  leave_waiting(job_id, owner, model, now)
  finalize(job_id, S_CANCELLED, {'error', error_json(code, message)}, now, result_ttl_ms)
  redis.call('PUBLISH', K_CANCEL_CHANNEL, job_id)
end

-- Queue a job again as its next attempt, keeping its place (a dead worker, a backend
-- that failed before any byte was relayed).
-- A batch line goes back to its batch's list (`job`: read with `batch`, `line`).
local function requeue(job_id, job, record_ttl_ms, extra)
  set_status(job_id, S_QUEUED, 'attempt', tonumber(job.attempt) + 1, 'worker', '',
    'backend', '', 'started_at', '', unpack(extra))
  redis.call('PEXPIRE', K_JOB .. job_id, record_ttl_ms)
  if job.batch then
    batch_line_return(job.batch, job.line, job.model)
    redis.call('HINCRBY', K_STATS, 'jobs_requeued', 1)
    wake_one()
    return
  end
  enqueue_waiting(job_id, job.owner, tonumber(job.score), job.model, tonumber(job.priority))
  redis.call('HINCRBY', K_STATS, 'jobs_requeued', 1)
  wake_one()
end
