-- The scheduler: grant up to `want` GPU slots to a worker, over every waiting job of the
-- fleet, in one decision (shared/scripts.py `dispatch`).
-- needs: clock, fleet, fairshare, batch, job
--
-- Which job: the owners with jobs waiting form groups by tier priority; the group whose
-- oldest job has the lowest start score goes first (a job of priority p counts as
-- admitted p seconds earlier: priority with aging). Within the group, the owner with the
-- lowest fair-share counter (VTC) goes first, then the oldest. An owner's jobs go in
-- start-score order; the first one that some backend can take now is granted.
--
-- Where: a backend that is up, has a free slot, can run the job's endpoint (an `openai`
-- backend runs only OpenAI's paths), serves the model (and is not one this job already
-- failed on, unless no other serves it). Among those, one with the model loaded, most
-- free slots first. Else the model must be loaded somewhere: on a backend whose loaded
-- models have no work waiting (an empty one first) when the job's expected wait for a
-- slot where the model is loaded (the jobs waiting for it at those slots' pace) is
-- longer than that backend's load time (measured, else a prior), or once it has waited
-- GPUGATE_AFFINITY_WAIT; a model loaded nowhere waits at most a load time, then switches
-- a backend whose loaded models have work waiting. A session's job prefers its backend
-- (`place`).
-- A job for a model that no backend serves (for its endpoint) goes to any backend, an
-- Ollama one first: Ollama's 404 answers it (the worker answers that 404 itself for a
-- native path on an `openai` backend).
--
-- Each grant charges the owner a provisional cost (the fleet's mean job cost / weight),
-- settled against the real usage by finish.lua, so several grants in one call alternate
-- between owners.
-- `A`: the worker's ask (shared/scripts.py `Ask`); the fleet in `argv` from `first` on
-- (lib/fleet.lua `read_backends`); `now`: the calling script's clock. Returns the grants.
local function schedule(A, argv, first, now)
  -- After a failover (or a restart from the append-only file) this Redis may lack the
  -- newest grants: the workers re-assert the runs they hold with their next heartbeat
  -- (heartbeat.lua), and until they had the time to, no slot is granted.
  -- K_FLEET's MASTER_FIELD: the run id of the Redis that last dispatched, and until when
  -- it is fenced.
  local state = fleet_state()
  local master = run_id_here()
  local known, fenced_until = string.match(state[MASTER_FIELD] or '', '^(%S+) ?(%d*)$')
  fenced_until = tonumber(fenced_until) or 0
  if known ~= master then
    if known then fenced_until = now + A.fence_ms end
    redis.call('HSET', K_FLEET, MASTER_FIELD, master .. ' ' .. fenced_until)
  end
  if now < fenced_until then return {} end

  local backends = read_backends(argv, first, now, state)
  local free_total = 0
  for _, b in ipairs(backends) do
    if b.up then free_total = free_total + b.free end
  end
  if free_total == 0 or A.want <= 0 then return {} end

  local owners = redis.call('ZRANGE', K_BACKLOG, 0, A.max_owners - 1, 'WITHSCORES')
  local priorities = {}  -- the owners waiting at a tier priority other than 0
  if #owners > 0 then
    local raw = redis.call('HGETALL', K_OWNER_PRIORITY)
    for i = 1, #raw, 2 do priorities[raw[i]] = tonumber(raw[i + 1]) end
  end
  local candidates = {}
  local group_head = {}
  for i = 1, #owners, 2 do
    local owner = owners[i]
    -- its head, and whether it is the owner's only job waiting (`alone`)
    local head = redis.call('ZRANGE', K_OWNER_QUEUE .. owner, 0, 1, 'WITHSCORES')
    if head[2] then
      local c = {owner = owner, counter = tonumber(owners[i + 1]), head = tonumber(head[2]),
        head_id = head[1], alone = head[3] == nil, priority = priorities[owner] or 0}
      table.insert(candidates, c)
      local g = group_head[c.priority]
      if g == nil or c.head < g then group_head[c.priority] = c.head end
    end
  end
  local function before(a, b)
    local ga, gb = group_head[a.priority], group_head[b.priority]
    if ga ~= gb then return ga < gb end
    if a.priority ~= b.priority then return a.priority > b.priority end
    if a.counter ~= b.counter then return a.counter < b.counter end
    return a.head < b.head
  end

  local waiting_models = {}
  local function has_waiting_work(model)
    if waiting_models[model] == nil then
      waiting_models[model] = (tonumber(redis.call('HGET', K_WAITING_MODELS, model)) or 0) > 0
    end
    return waiting_models[model]
  end

  -- The models loaded on `b` as far as gpugate knows: what its /api/ps last showed (the
  -- fleet loop) and what was granted there since. A grant that loaded a model there may
  -- have evicted the others (a backend holds as many as its memory does), so a model last
  -- seen before that grant counts as loaded again only once /api/ps shows it still is;
  -- otherwise its jobs would be sent back at once, and the two would take turns loading.
  local residents = {}
  local function resident(b)
    if residents[b.name] == nil then
      local at, switched_to = nil, nil
      if b.switched then at, switched_to = string.match(b.switched, '^(%d+) (.*)$') end
      at = tonumber(at)
      local set = {}
      local seen = redis.call('ZRANGE', K_BACKEND_LOADED .. b.name, 0, -1, 'WITHSCORES')
      for i = 1, #seen, 2 do
        if not at or tonumber(seen[i + 1]) >= at or seen[i] == switched_to then
          set[seen[i]] = true
        end
      end
      residents[b.name] = set
    end
    return residents[b.name]
  end

  local function loaded(b, model)
    return resident(b)[model] == true
  end

  -- True when sending another model to `b` would switch it away from one with work waiting.
  local function busy_with_other(b, model)
    for m in pairs(resident(b)) do
      if m ~= model and has_waiting_work(m) then return true end
    end
    return false
  end

  local function most_free(list)
    local best = nil
    for _, b in ipairs(list) do
      if best == nil or b.free > best.free then best = b end
    end
    return best
  end

  -- Waiting against loading: how long a job of `model` can expect to wait for a slot where
  -- it is loaded (the jobs waiting for it, at the pace of the loaded backends' slots), and
  -- what a load costs on backend `b` (its measured load_duration, else the last measured on
  -- any backend, else the prior).
  local function expected_wait_ms(model, loaded_cap)
    local waiting = math.max(1, tonumber(redis.call('HGET', K_WAITING_MODELS, model)) or 1)
    local means = redis.call('HMGET', K_MODEL_STATS, model, MEAN_JOB_MS)
    local mean = tonumber(means[1] or means[2]) or A.job_prior_ms
    return waiting * mean / math.max(1, loaded_cap)
  end

  local function load_ms(b, model)
    local known = redis.call('HMGET', K_LOAD_MS, b.name .. '|' .. model, '*|' .. model)
    return tonumber(known[1]) or tonumber(known[2]) or A.load_prior_ms
  end

  local function choose_backend(model, endpoint, avoid, waited_ms)
    local serving, open = {}, {}
    for _, b in ipairs(backends) do
      if runs_endpoint(b, endpoint) and serves(b, model) then
        table.insert(serving, b)
        if b.up and b.free > 0 then table.insert(open, b) end
      end
    end
    if #serving == 0 then  -- nobody serves it: any backend, for Ollama's own answer
      local other = nil
      for _, b in ipairs(backends) do
        if b.up and b.free > 0 then
          if b.kind ~= 'openai' then return b end
          other = other or b
        end
      end
      return other
    end
    -- not where this job already failed while another backend that serves it is up: it
    -- waits for that one's slot (going back at once to the one that just failed it is how a
    -- job whose backend died ran out of attempts there while the other one was busy)
    local function avoided(b)
      return string.find(' ' .. avoid .. ' ', ' ' .. b.name .. ' ', 1, true) ~= nil
    end
    local fresh, fresh_up = {}, false
    for _, b in ipairs(serving) do
      if b.up and not avoided(b) then fresh_up = true end
    end
    for _, b in ipairs(open) do
      if not avoided(b) then table.insert(fresh, b) end
    end
    if #fresh > 0 or fresh_up then open = fresh end
    if #open == 0 then return nil end
    local hot, idle, empty = {}, {}, {}
    for _, b in ipairs(open) do
      if loaded(b, model) then
        table.insert(hot, b)
      elseif not busy_with_other(b, model) then
        table.insert(idle, b)
        if next(resident(b)) == nil then table.insert(empty, b) end
      end
    end
    if #hot > 0 then return most_free(hot) end
    -- the model is loaded only on busy backends (or nowhere): waiting against loading
    local loaded_cap = 0
    for _, b in ipairs(serving) do
      if b.up and loaded(b, model) then loaded_cap = loaded_cap + b.cap end
    end
    local fresh = most_free(empty) or most_free(idle)  -- a load there evicts no waited-for work
    if fresh then
      if loaded_cap > 0 and waited_ms < A.affinity_wait_ms
          and expected_wait_ms(model, loaded_cap) <= load_ms(fresh, model) then
        return nil  -- a slot where it is loaded comes sooner than a load would finish
      end
      return fresh
    end
    -- only backends whose loaded models have work waiting are free: where the model is
    -- loaded, a slot comes (switching a second backend to it would evict for nothing);
    -- loaded nowhere, the job waits what a load costs, then one backend switches to it:
    -- not one that switched within SWITCH_HOLD_LOADS of its load time (a switch must pay
    -- for its load: with more models than backends they would take turns evicting each
    -- other), unless the job has waited GPUGATE_AFFINITY_WAIT
    if loaded_cap > 0 then return nil end
    local switch = most_free(open)
    if #serving == 1 then return switch end
    if waited_ms >= A.affinity_wait_ms then return switch end
    if waited_ms < load_ms(switch, model) then return nil end
    local settled = {}
    for _, b in ipairs(open) do
      local at, resident = nil, nil
      if b.switched then at, resident = string.match(b.switched, '^(%d+) (.*)$') end
      if not at or now - tonumber(at) >= A.switch_hold_loads * load_ms(b, resident) then
        table.insert(settled, b)
      end
    end
    return most_free(settled)
  end

  -- the highest counter served so far (lib/fairshare.lua `fair_share_floor`)
  local vtc_floor = tonumber(redis.call('HGET', K_STATS, 'vtc_floor')) or 0

  -- Sessions (api/sessions.py): a job of a session goes to the backend that ran its last
  -- job while that one serves it and has a free slot, or frees one within session_wait
  -- (the job waits: nil); otherwise dispatch chooses as for any job and the session moves.
  local by_name = {}
  for _, b in ipairs(backends) do by_name[b.name] = b end

  local function session_backend(job, waited_ms)
    if not job.session or A.session_ttl_ms <= 0 then return nil, nil end
    local name = redis.call('GET', K_SESSION .. job.session)
    if not name then return nil, 'new' end
    local b = by_name[name]
    -- not where this job already failed (a retry moves the session)
    if b and string.find(' ' .. (job.avoid or '') .. ' ', ' ' .. name .. ' ', 1, true) then
      b = nil
    end
    if b and b.up and runs_endpoint(b, job.endpoint) and serves(b, job.model) then
      if b.free > 0 then return b, 'kept' end
      if waited_ms < A.session_wait_ms then return false, nil end  -- its slot comes soon
    end
    return nil, 'moved'
  end

  local function place(job)
    local waited_ms = now - tonumber(job.created_at)
    local b, outcome = session_backend(job, waited_ms)
    if b == false then return nil end
    b = b or choose_backend(job.model, job.endpoint, job.avoid or '', waited_ms)
    if b and outcome then
      redis.call('SET', K_SESSION .. job.session, b.name, 'PX', A.session_ttl_ms)
      redis.call('HINCRBY', K_STATS, 'session_' .. outcome, 1)
    end
    return b
  end

  -- Job `job_id` takes a slot of backend `b` (either band): its run enters the running
  -- sets, the job `running`, the grant made for the worker (`job`: read with its `body`,
  -- `owner_name` and `traceparent`).
  local function occupy(job_id, job, b, cost, fields)
    local run_id = run_of(job_id, job.attempt)
    redis.call('ZADD', K_BACKEND_RUNNING .. b.name, now, run_id)
    redis.call('ZADD', K_LEASES, now + A.lease_ms, run_id)
    local cold = not loaded(b, job.model)  -- the run pays the model's load there
    if cold then  -- (a model that is loaded there stays so: no need to say it again)
      redis.call('ZADD', K_BACKEND_LOADED .. b.name, now, job.model)
      b.switched = now .. ' ' .. job.model
      redis.call('HSET', K_FLEET, 'switched:' .. b.name, b.switched)
      residents[b.name] = {[job.model] = true}
    end
    set_status(job_id, S_RUNNING, 'started_at', now,
      'worker', A.worker, 'backend', b.name, 'runs', tonumber(job.runs) + 1,
      'vtc_charged', tostring(cost), unpack(fields or {}))
    b.free = b.free - 1
    b.running = b.running + 1
    free_total = free_total - 1
    local out = {run_id = run_id, job_id = job_id, attempt = tonumber(job.attempt),
      endpoint = job.endpoint, body = job.body, stream = job.stream == '1', backend = b.name,
      model = job.model, owner_name = job.owner_name, usage_name = job.usage_name, cold = cold,
      cap = b.cap}
    if job.traceparent then  -- traced (shared/telemetry.py): the worker's spans join the trace
      out.traceparent, out.queued_at_ms, out.started_at_ms = job.traceparent, tonumber(job.created_at), now
    end
    return out
  end

  local function grant(c, job_id, job, b, alone)
    local weight = tonumber(job.weight) or 1
    local cost = A.provisional_cost / weight
    if c.counter > vtc_floor then
      vtc_floor = c.counter
      redis.call('HSET', K_STATS, 'vtc_floor', tostring(vtc_floor))
    end
    c.drained = leave_waiting(job_id, c.owner, job.model, now, job.deadline_at == '', c.priority,
      alone)
    if c.drained then  -- out of the backlog, marked idle from now (leave_waiting)
      redis.call('ZINCRBY', K_VTC, cost, c.owner)
    else
      charge(c.owner, cost, now)
    end
    c.counter = c.counter + cost
    waiting_models[job.model] = nil
    local out = occupy(job_id, job, b, cost)
    out.waited_ms = now - tonumber(job.created_at)  -- the worker's queue-wait histogram
    return out
  end

  -- max_running (api/apikeys.py): a known key's runs now (entries of runs that ended are
  -- dropped here), and its limit: the live one of its /admin/keys record, else its tier's.
  local function runs_of_owner(owner)
    local key = K_OWNER_RUNNING .. owner
    local n = 0
    for _, run in ipairs(redis.call('ZRANGE', key, 0, -1)) do
      if redis.call('ZSCORE', K_LEASES, run) then n = n + 1 else redis.call('ZREM', key, run) end
    end
    return n
  end

  local function running_limit(job)
    if job.key_record then
      local live = redis.call('HGET', K_APIKEY .. job.key_record, 'max_running')
      if live and live ~= '' then return tonumber(live) end
    end
    return tonumber(job.max_running)
  end

  local OWNER_RUNNING_TTL_MS = 86400000

  local function track_run(owner, run_id, job)
    if job.usage_name == 'anonymous' and not job.max_running then return end
    local key = K_OWNER_RUNNING .. owner
    redis.call('ZADD', key, now, run_id)
    redis.call('PEXPIRE', key, OWNER_RUNNING_TTL_MS)
  end

  -- Job `job_id` of owner `c`, granted if a backend can take it now; `true` as the second
  -- value when none of the owner's jobs may start now (its max_running).
  local function try_job(c, job_id, alone)
    local job = read_job(job_id, 'status', 'attempt', 'model', 'avoid', 'created_at',
      'deadline_at', 'endpoint', 'stream', 'weight', 'runs', 'held', 'max_running',
      'key_record', 'usage_name', 'session', 'body', 'owner_name', 'traceparent')
    local deadline = tonumber(job.deadline_at)
    if job.held then  -- admitted, but not yet on the replicas (release.lua)
    elseif job.status ~= S_QUEUED then
      leave_waiting(job_id, c.owner, job.model or '', now)  -- a stray entry: mend it
    elseif deadline and now >= deadline then
      cancel_queued(job_id, c.owner, job.model, E_DEADLINE_EXCEEDED,
        'The job was still queued when its deadline passed.', now, A.result_ttl_ms)
    else
      local limit = running_limit(job)
      if limit and runs_of_owner(c.owner) >= limit then return nil, true end  -- the others wait
      local b = place(job)
      if b then
        local granted = grant(c, job_id, job, b, alone)
        track_run(c.owner, granted.run_id, job)
        return granted
      end
    end
    return nil
  end

  -- The first job of owner `c` that a backend can take now, granted; nil if none. Its head
  -- (read with the candidates) first: the others are read only when the head cannot start.
  local function grant_for(c)
    local head_id, alone = c.head_id, c.alone
    c.head_id, c.alone = nil, nil  -- after this call, the head may have moved
    if head_id then
      local granted, stop = try_job(c, head_id, alone)
      if granted or stop then return granted end
    end
    for _, job_id in ipairs(redis.call('ZRANGE', K_OWNER_QUEUE .. c.owner, 0, A.scan_per_owner - 1)) do
      if job_id ~= head_id then
        local granted, stop = try_job(c, job_id)
        if granted or stop then return granted end
      end
    end
    return nil
  end

  -- The batch band (lib/batch.lua): a slot that no waiting interactive job took runs a
  -- batch line. Batch owners take turns by their own fair-share counter; an owner's oldest
  -- batch goes first. Of a batch's models, one loaded on a free backend goes first (lines
  -- of one model run together), else the one with the most lines waiting, on a backend
  -- whose loaded models no interactive job waits for (a batch never evicts one that is
  -- waited for). The line becomes a job record at its first start (the same record on a
  -- retry); a key's max_running and budget hold its lines back as its jobs.
  local function batch_place(model, endpoint)
    local hot, idle, any = nil, nil, nil
    local served = false
    for _, b in ipairs(backends) do
      if runs_endpoint(b, endpoint) and serves(b, model) then
        served = true
        if b.up and b.free > 0 then
          if loaded(b, model) then
            if hot == nil or b.free > hot.free then hot = b end
          elseif not busy_with_other(b, model) then
            if idle == nil or b.free > idle.free then idle = b end
          end
        end
      elseif b.up and b.free > 0 and (any == nil or any.kind == 'openai') then
        any = b
      end
    end
    if not served then return nil, any end  -- nobody serves it: the backend's own 404
    return hot, idle
  end

  -- The key's budget (the period's counter the batch loop keeps current): its live size on
  -- an /admin/keys record (an operator may raise it), else the one the batch was made with.
  local function batch_budget_spent(batch)
    if not batch.budget_key or batch.budget_key == '' then return false end
    local tokens = tonumber(batch.budget_tokens)
    if batch.key_record then
      local live = redis.call('HGET', K_APIKEY .. batch.key_record, 'budget')
      if live == '' then return false end
      if live then tokens = tonumber(cjson.decode(live).tokens) or tokens end
    end
    local used = tonumber(redis.call('GET', batch.budget_key)) or 0
    return used >= (tokens or math.huge)
  end

  local function start_line(c, batch_id, batch, model, b)
    local n = batch_pop(batch_id, model, 1)[1]
    if not n then return nil end
    local limits = {usage_name = batch.usage_name, max_running = batch.max_running}
    local job_id = line_job_id(batch_id, n)
    local job = read_job(job_id, 'status', 'attempt', 'runs', 'model', 'endpoint', 'created_at',
      'custom_id', 'body', 'owner_name')
    if not job.status then  -- its first start: the line becomes a job
      local line = cjson.decode(redis.call('HGET', K_BATCH_LINES .. batch_id, n))
      job = {attempt = 1, runs = 0, model = model, endpoint = batch.endpoint, created_at = now,
        custom_id = line.custom_id, body = line.body, owner_name = batch.owner_name}
      set_status(job_id, S_QUEUED, 'id', job_id, 'owner', c.owner,
        'owner_name', batch.owner_name, 'usage_name', batch.usage_name,
        'endpoint', batch.endpoint, 'model', model, 'body', line.body, 'stream', 0, 'sync', 0,
        'created_at', now, 'score', 0, 'priority', -1, 'weight', batch.weight,
        'attempt', 1, 'runs', 0, 'batch', batch_id, 'line', n, 'custom_id', line.custom_id)
      if batch.budget_key and batch.budget_key ~= '' then
        redis.call('HSET', K_JOB .. job_id, 'budget_key', batch.budget_key, 'budget_reserved', 0)
      end
      redis.call('PEXPIRE', K_JOB .. job_id, tonumber(batch.files_ttl_ms))
      redis.call('HINCRBY', K_USAGE, batch.usage_name .. '|requests', 1)
    end
    job.usage_name = batch.usage_name
    batch_move(batch_id, -1, 1)
    local cost = A.provisional_cost / (tonumber(batch.weight) or 1)
    charge_batch(c.owner, cost)
    c.counter = c.counter + cost
    local out = occupy(job_id, job, b, cost)
    out.batch, out.custom_id = batch_id, job.custom_id
    track_run(c.owner, out.run_id, limits)
    return out
  end

  local function line_for(c)
    for _, batch_id in ipairs(redis.call('ZRANGE', K_BATCH_OWNER .. c.owner, 0, 7)) do
      local v = redis.call('HMGET', K_BATCH .. batch_id, 'status', 'todo', 'endpoint',
        'budget_key', 'budget_tokens', 'max_running', 'key_record', 'weight', 'owner_name',
        'usage_name', 'files_ttl_ms')
      local batch = {status = v[1], todo = tonumber(v[2]) or 0, endpoint = v[3],
        budget_key = v[4], budget_tokens = v[5], weight = v[8], owner_name = v[9],
        usage_name = v[10], files_ttl_ms = v[11]}
      -- as a job carries them (absent when the key has none)
      if v[6] and v[6] ~= '0' and v[6] ~= '' then batch.max_running = v[6] end
      if v[7] and v[7] ~= '' then batch.key_record = v[7] end
      if batch.status ~= B_IN_PROGRESS then
        redis.call('ZREM', K_BATCH_OWNER .. c.owner, batch_id)  -- ending: the batch loop drains it
      elseif batch.todo > 0 then
        if batch_budget_spent(batch) then return nil end
        local limit = running_limit(batch)
        if limit and runs_of_owner(c.owner) >= limit then return nil end
        local models = redis.call('HGETALL', K_BATCH_MODELS .. batch_id)
        local fallback, fallback_model, most = nil, nil, -1
        for i = 1, #models, 2 do
          local model, waiting = models[i], tonumber(models[i + 1])
          local hot, idle = batch_place(model, batch.endpoint)
          if hot then return start_line(c, batch_id, batch, model, hot) end
          if idle and waiting > most then fallback, fallback_model, most = idle, model, waiting end
        end
        if fallback then return start_line(c, batch_id, batch, fallback_model, fallback) end
      end
    end
    if redis.call('ZCARD', K_BATCH_OWNER .. c.owner) == 0 then
      redis.call('ZREM', K_BATCH_BACKLOG, c.owner)
    end
    return nil
  end

  -- Grants, in turn, from a band's candidates in `order` (`take`: the owner's next grant,
  -- or nil when it has none a backend can take now; an owner whose last waiting job was
  -- granted, `drained`, is not asked again).
  local grants = {}
  local function take_turns(list, order, take)
    local stuck = {}
    while #grants < A.want and free_total > 0 do
      table.sort(list, order)
      local granted = nil
      for _, c in ipairs(list) do
        if not (stuck[c.owner] or c.drained) then
          granted = take(c)
          if granted then break end
          stuck[c.owner] = true
        end
      end
      if granted == nil then return end
      table.insert(grants, granted)
    end
  end

  take_turns(candidates, before, grant_for)
  if #grants < A.want and free_total > 0 then
    local batch_owners = {}
    local raw = redis.call('ZRANGE', K_BATCH_BACKLOG, 0, A.max_owners - 1, 'WITHSCORES')
    for i = 1, #raw, 2 do
      table.insert(batch_owners, {owner = raw[i], counter = tonumber(raw[i + 1])})
    end
    take_turns(batch_owners, function(a, b)
      if a.counter ~= b.counter then return a.counter < b.counter end
      return a.owner < b.owner
    end, line_for)
  end
  return grants
end
