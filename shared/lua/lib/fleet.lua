-- The fleet: live workers, the backends a script is passed with their caps and state,
-- waking an idle worker.

local function live_workers(now, stale_ms)
  return redis.call('ZCOUNT', K_WORKERS, now - stale_ms, '+inf')
end

-- Whether a backend whose breaker field (K_FLEET down:<name>) is `down_until` is up.
local function is_up(down_until, now)
  return not down_until or now >= tonumber(down_until)
end

-- The fleet's state (K_FLEET) as a table: field -> value.
local function fleet_state()
  local raw = redis.call('HGETALL', K_FLEET)
  local state = {}
  for i = 1, #raw, 2 do state[raw[i]] = raw[i + 1] end
  return state
end

-- The fleet as passed in the script's arguments `argv` from index `first` on: name,
-- configured cap, kind, name, ...; each with its state in K_FLEET (`state`: fleet_state()).
-- `cap` is what dispatch may fill: the operator's live cap (else the configured one), or
-- below it the effective cap that adaptive concurrency found (worker/adaptive.py).
local function read_backends(argv, first, now, state)
  local backends = {}
  for i = first, #argv, 3 do
    local name = argv[i]
    local b = {name = name, kind = argv[i + 2]}
    b.cap = tonumber(state['cap:' .. name]) or tonumber(argv[i + 1])
    local effective = tonumber(state['effective:' .. name])
    if effective then b.cap = math.min(b.cap, effective) end
    b.running = redis.call('ZCARD', K_BACKEND_RUNNING .. name)
    b.up = is_up(state['down:' .. name], now)
    b.any_model = state['models:' .. name] == nil
    b.switched = state['switched:' .. name]
    b.free = math.max(0, b.cap - b.running)
    table.insert(backends, b)
  end
  return backends
end

local function serves(b, model)
  return b.any_model or redis.call('SISMEMBER', K_BACKEND_MODELS .. b.name, model) == 1
end

-- Whether `b` can run a job of `endpoint`: an `openai` backend runs only OpenAI's paths.
local function runs_endpoint(b, endpoint)
  return b.kind ~= 'openai' or OPENAI_PATHS[endpoint] == true
end

-- Wake one idle worker (BLPOP on K_WAKE); the list stays short when no worker is idle.
local function wake_one()
  if redis.call('LPUSH', K_WAKE, 1) > WAKE_MAX then redis.call('LTRIM', K_WAKE, 0, WAKE_MAX - 1) end
end
