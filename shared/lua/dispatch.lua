-- uses: clock, schedule
-- A worker asks for work (shared/scripts.py `dispatch`): up to `want` runs, granted by
-- the scheduler (lib/schedule.lua).
local A = cjson.decode(ARGV[1])
return cjson.encode(schedule(A, ARGV, 2, now_ms()))
