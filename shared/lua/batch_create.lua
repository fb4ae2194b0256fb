-- uses: clock, fleet, fairshare, webhook, batch
-- A batch, as api/batches.py validated it (shared/scripts.py `batch_create`): `failed`
-- with the file's errors, or `in_progress` with its lines waiting (the API wrote them,
-- numbered 1..total, into its lines and per-model lists first), its owner in the batch
-- band of the scheduler (lib/schedule.lua), and idle workers woken to run them.
local A = cjson.decode(ARGV[1])
local now = now_ms()
local now_s = math.floor(now / 1000)
local bk = K_BATCH .. A.batch_id
redis.call('HSET', bk, 'id', A.batch_id, 'owner', A.owner, 'owner_name', A.owner_name,
  'usage_name', A.usage_name, 'hook', A.hook, 'endpoint', A.endpoint,
  'input_file_id', A.input_file_id, 'completion_window', A.completion_window,
  'metadata', A.metadata, 'created_at', now_s, 'expires_at', math.floor(now_s + A.window_s),
  'expires_ms', now + A.window_s * 1000, 'files_ttl_ms', A.files_ttl_ms, 'weight', A.weight,
  'key_record', A.key_record, 'max_running', A.max_running, 'budget_tokens', A.budget_tokens,
  'budget_period', A.budget_period, 'budget_key', A.budget_key,
  'total', A.total, 'todo', 0, 'running', 0, 'completed', 0, 'failed', 0)
redis.call('ZADD', K_BATCHES_OF .. A.owner, now, A.batch_id)
if A.errors then
  redis.call('HSET', bk, 'status', B_FAILED, 'failed_at', now_s, 'errors', A.errors)
  redis.call('PEXPIRE', bk, A.files_ttl_ms)
  redis.call('HINCRBY', K_STATS, 'batches_' .. B_FAILED, 1)
  emit_webhook(A.hook, 'batch.' .. B_FAILED, A.batch_id, now)
  return cjson.encode({status = B_FAILED})
end
redis.call('HSET', bk, 'status', B_IN_PROGRESS, 'in_progress_at', now_s)
redis.call('PERSIST', bk)
batch_move(A.batch_id, A.total, 0)
redis.call('ZADD', K_BATCH_ACTIVE, now + A.window_s * 1000, A.batch_id)
redis.call('ZADD', K_BATCH_OWNER .. A.owner, now, A.batch_id)
join_batch_band(A.owner)
for _ = 1, math.min(A.total, WAKE_MAX) do wake_one() end
return cjson.encode({status = B_IN_PROGRESS})
