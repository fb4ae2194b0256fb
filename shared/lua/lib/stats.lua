-- Histograms the scripts keep in Redis (api/metrics.py adds them up for /metrics).

-- A histogram observation: one count in the value's own bucket (the smallest bound it
-- is under), the total count and the sum; /metrics adds the buckets up (api/metrics.py).
local function observe(name, value, bounds)
  local key = K_HISTOGRAM .. name
  local bucket = '+Inf'
  for _, le in ipairs(bounds) do
    if value <= le then bucket = tostring(le); break end
  end
  redis.call('HINCRBY', key, bucket, 1)
  redis.call('HINCRBYFLOAT', key, 'sum', value)
end
