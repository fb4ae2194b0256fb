-- The fleet's moving means (K_MODEL_STATS), folded in from a worker's tally
-- (worker/tally.py, shared/scripts.py `fold_means`): each sample, in the order its run
-- ended, moves its field's mean by `weight` (EWMA), as if each finish had moved it.
-- Fields: MEAN_COST, a job's cost for whatever was served (the provisional charge of
-- dispatch.lua); MEAN_JOB_MS and a model's name, a success's service time (wait estimates).
local A = cjson.decode(ARGV[1])
local samples = A.samples
local fields, seen = {}, {}
for i = 1, #samples, 2 do
  if not seen[samples[i]] then
    seen[samples[i]] = true
    table.insert(fields, samples[i])
  end
end
if #fields == 0 then return '{}' end
local means = {}
local current = redis.call('HMGET', K_MODEL_STATS, unpack(fields))
for i, field in ipairs(fields) do means[field] = tonumber(current[i]) end
for i = 1, #samples, 2 do
  local field, value = samples[i], samples[i + 1]
  local mean = means[field]
  means[field] = mean and (mean + A.weight * (value - mean)) or value
end
local update = {}
for _, field in ipairs(fields) do
  table.insert(update, field)
  table.insert(update, tostring(means[field]))
end
redis.call('HSET', K_MODEL_STATS, unpack(update))
return '{}'
