-- Batches (OpenAI's Batch API, api/batches.py): a batch's lines wait in its own lists, not
-- in the interactive queue; the scheduler starts one only on a slot no waiting interactive
-- job can take. A line that starts becomes a job record (`batch`, `line`, `custom_id`)
-- that runs and ends like any job; its end is written once into the batch's output or
-- error lines (keyed by custom_id), and the batch ends when no line waits or runs.
-- The batch's fields are the table of shared/batches.py.
-- needs: clock, webhook

-- The job id of line `n` of a batch: the same for every attempt, and the output line's id.
local function line_job_id(batch_id, n)
  return 'batch_req_' .. string.sub(redis.sha1hex(batch_id .. ' ' .. n), 1, 24)
end

-- Count lines moving between waiting (`todo`), running and ended, on the batch and in the
-- fleet's totals (/v1/queue's batch_queued and batch_running).
local function batch_move(batch_id, todo, running)
  local bk = K_BATCH .. batch_id
  if todo ~= 0 then
    redis.call('HINCRBY', bk, 'todo', todo)
    redis.call('HINCRBY', K_STATS, 'batch_queued', todo)
  end
  if running ~= 0 then
    redis.call('HINCRBY', bk, 'running', running)
    redis.call('HINCRBY', K_STATS, 'batch_running', running)
  end
end

-- Take line numbers off a model's list; the model's count follows.
local function batch_pop(batch_id, model, count)
  local lines = redis.call('LPOP', K_BATCH_TODO .. batch_id .. ':' .. model, count)
  local taken = lines and #lines or 0
  local mk = K_BATCH_MODELS .. batch_id
  if taken == 0 or redis.call('HINCRBY', mk, model, -taken) <= 0 then
    redis.call('HDEL', mk, model)
  end
  return lines or {}
end

-- A line that ran and will run again (its worker died, its backend failed first): back at
-- the head of its model's list, so it starts next.
local function batch_line_return(batch_id, n, model)
  redis.call('LPUSH', K_BATCH_TODO .. batch_id .. ':' .. model, n)
  redis.call('HINCRBY', K_BATCH_MODELS .. batch_id, model, 1)
  batch_move(batch_id, 1, -1)
end

-- An error file line of gpugate's own (cancelled, expired, a worker lost).
local function error_line(job_id, custom_id, code, message)
  return cjson.encode({id = job_id, custom_id = custom_id, response = cjson.null,
    error = {code = code, message = message}})
end

-- Write a line's end into the output (ok) or error lines, once per custom_id whatever
-- retries or reports come after; counted where it was written (`label`: the metrics'
-- outcome, when not completed or failed).
local function batch_write(batch_id, custom_id, ok, line, label)
  local bk = K_BATCH .. batch_id
  local other = (ok and K_BATCH_ERR or K_BATCH_OUT) .. batch_id
  if redis.call('HEXISTS', other, custom_id) == 1 then return false end
  local target = (ok and K_BATCH_OUT or K_BATCH_ERR) .. batch_id
  if redis.call('HSETNX', target, custom_id, line) == 0 then return false end
  local outcome = ok and 'completed' or 'failed'
  redis.call('HINCRBY', bk, outcome, 1)
  redis.call('HINCRBY', bk, ok and 'output_bytes' or 'error_bytes', #line + 1)  -- the file's size
  redis.call('HINCRBY', K_STATS, 'batch_lines_' .. (label or outcome), 1)
  return true
end

-- The batch ends once nothing waits or runs: `completed`, or `expired` / `cancelled` if it
-- was ending so; its output and error files appear (each only if it has lines), its
-- working sets go, its key's webhook is told.
local function batch_settle(batch_id, now)
  local bk = K_BATCH .. batch_id
  local b = redis.call('HMGET', bk, 'status', 'todo', 'running', 'ending', 'owner', 'hook',
    'files_ttl_ms', 'completed', 'failed', 'finalizing_at', 'output_bytes', 'error_bytes')
  local status = b[1]
  if status ~= B_IN_PROGRESS and status ~= B_FINALIZING and status ~= B_CANCELLING then
    return false
  end
  if (tonumber(b[2]) or 0) > 0 or (tonumber(b[3]) or 0) > 0 then return false end
  local final = B_COMPLETED
  if b[4] == 'expired' then final = B_EXPIRED elseif b[4] == 'cancelled' then final = B_CANCELLED end
  local owner, ttl_ms, now_s = b[5], tonumber(b[7]), math.floor(now / 1000)
  local fields = {final .. '_at', now_s}
  if not b[10] or b[10] == '' then
    table.insert(fields, 'finalizing_at'); table.insert(fields, now_s)
  end
  for _, part in ipairs({{'output', K_BATCH_OUT, tonumber(b[8]) or 0, b[11] or 0},
                         {'error', K_BATCH_ERR, tonumber(b[9]) or 0, b[12] or 0}}) do
    local kind, lines = part[1], part[2] .. batch_id
    redis.call('PEXPIRE', lines, ttl_ms)
    if part[3] > 0 then
      local file_id = 'file-' .. string.sub(redis.sha1hex(kind .. ' ' .. batch_id), 1, 24)
      redis.call('HSET', K_FILE .. file_id, 'id', file_id, 'owner', owner,
        'filename', batch_id .. '_' .. kind .. '.jsonl', 'purpose', 'batch_output',
        'created_at', now_s, 'batch', batch_id, 'lines', lines, 'bytes', part[4])
      redis.call('PEXPIRE', K_FILE .. file_id, ttl_ms)
      redis.call('ZADD', K_FILES_OF .. owner, now, file_id)
      table.insert(fields, kind .. '_file_id'); table.insert(fields, file_id)
    end
  end
  redis.call('HSET', bk, 'status', final, unpack(fields))
  redis.call('PEXPIRE', bk, ttl_ms)
  redis.call('DEL', K_BATCH_LINES .. batch_id, K_BATCH_MODELS .. batch_id)
  redis.call('ZREM', K_BATCH_ACTIVE, batch_id)
  redis.call('ZREM', K_BATCH_OWNER .. owner, batch_id)
  if redis.call('ZCARD', K_BATCH_OWNER .. owner) == 0 then
    redis.call('ZREM', K_BATCH_BACKLOG, owner)
  end
  emit_webhook(b[6], 'batch.' .. final, batch_id, now)
  return true
end

-- A line's job ended (finalize in lib/job.lua): its line written, the batch settled if
-- that was its last. `line`: the output or error line the worker built from the backend's
-- answer; none when the gateway ended it (a worker lost): an error line of ours.
local function batch_line_end(job_id, job, status, error_text, line, now)
  local ok = status == S_SUCCEEDED
  if not line or line == '' then
    local err = error_text and error_text ~= '' and cjson.decode(error_text) or {}
    line = error_line(job_id, job.custom_id, err.code or status, err.message or status)
  end
  batch_write(job.batch, job.custom_id, ok, line)
  batch_move(job.batch, 0, -1)
  redis.call('DEL', K_JOB .. job_id)  -- the line holds what it answered
  batch_settle(job.batch, now)
end

-- Lines that will never start (the batch was cancelled or expired), up to `count` of them,
-- go to the error file with `code`; true once none is left.
local function batch_drain(batch_id, ending, code, message, count)
  local mk = K_BATCH_MODELS .. batch_id
  local models = redis.call('HKEYS', mk)
  local left = count
  for _, model in ipairs(models) do
    if left <= 0 then return false end
    local lines = batch_pop(batch_id, model, left)
    for _, n in ipairs(lines) do
      local raw = redis.call('HGET', K_BATCH_LINES .. batch_id, n)
      local custom_id = raw and cjson.decode(raw).custom_id or tostring(n)
      batch_write(batch_id, custom_id, false,
        error_line(line_job_id(batch_id, n), custom_id, code, message), ending)
    end
    batch_move(batch_id, -#lines, 0)
    left = left - #lines
  end
  return redis.call('HLEN', mk) == 0
end
