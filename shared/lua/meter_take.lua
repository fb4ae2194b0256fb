-- The adaptive controller takes a backend's measurement window (shared/scripts.py
-- `meter_take`): what its jobs did since the last decision, once at least `min_jobs`
-- ended; the workers keep adding to a new window meanwhile. Nothing when too few ended.
local A = cjson.decode(ARGV[1])
local key = K_METER .. A.backend
local jobs = tonumber(redis.call('HGET', key, 'jobs')) or 0
if jobs < A.min_jobs then return cjson.encode({}) end
local raw = redis.call('HGETALL', key)
redis.call('DEL', key)
local out = {}
for i = 1, #raw, 2 do out[raw[i]] = tonumber(raw[i + 1]) end
return cjson.encode(out)
