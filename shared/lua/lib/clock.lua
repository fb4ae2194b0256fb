-- Time and names: the clock of the Redis that runs the script, run ids, error objects.

-- The time in whole ms, and exact to the microsecond (a fraction of a ms): scripts run one
-- at a time on a Redis, so no two of them see the same microsecond.
local function clock_ms()
  local t = redis.call('TIME')
  local whole = tonumber(t[1]) * 1000
  local us = tonumber(t[2])
  return whole + math.floor(us / 1000), whole + us / 1000
end

local function now_ms()
  return (clock_ms())
end

local function run_of(job_id, attempt)
  return job_id .. '.' .. attempt
end

local function split_run(run_id)
  local job_id, attempt = string.match(run_id, '^(.*)%.(%d+)$')
  return job_id, tonumber(attempt)
end

local function error_json(code, message)
  return cjson.encode({code = code, message = message})
end

-- The run id of the Redis process running the library (INFO server: 65k instructions, as
-- much as the rest of a dispatch's fixed part), asked once: it never changes while the
-- process lives, and a library's locals live no longer than its process (a restart, a
-- full resync from a master or a FUNCTION LOAD starts them afresh; a partial resync keeps
-- them, and the run id with them, still this process's).
local this_run_id = nil
local function run_id_here()
  if this_run_id == nil then
    this_run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
  end
  return this_run_id
end
