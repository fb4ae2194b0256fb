-- wrk script of bench/admission: POST one JSON body, and count every response that is not
-- the expected one, so that a case cannot silently measure errors.
-- args: expected status, text the body must contain, API key,
--       "fresh" (a new key per request: key-1, key-2, ...) or "fixed", body JSON
-- done() prints: RESULT requests duration_us unexpected connect read write timeout
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  expected_status = tonumber(args[1])
  expected_text = args[2]
  key = args[3]
  fresh = args[4] == "fresh"
  payload = args[5]
  sent = 0
  unexpected = 0
end

function request()
  sent = sent + 1
  local k = fresh and (key .. "-" .. sent) or key
  local headers = {["Content-Type"] = "application/json", ["X-API-Key"] = k}
  return wrk.format("POST", nil, headers, payload)
end

function response(status, headers, body)
  if status ~= expected_status or not string.find(body, expected_text, 1, true) then
    unexpected = unexpected + 1
  end
end

function done(summary, latency, requests)
  local total = 0
  for _, thread in ipairs(threads) do
    total = total + thread:get("unexpected")
  end
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d\n", summary.requests, summary.duration,
    total, e.connect, e.read, e.write, e.timeout))
end
