"""The one harness of gpugate's tests, benchmarks and `gpugate up`: real processes on free
loopback ports, stopped by PID, and what measuring them needs.

- `processes`: free ports, a child process started and stopped by PID, waits on a
  condition with a deadline and a message naming what was expected.
- `stack`: redis-server, the simulator, the API and workers; a stack of them with
  GPUGATE_* settings, ready when its workers are.
- `sentinel`: a Redis Sentinel cluster (a master, two replicas, three Sentinels).
- `llama`: llama.cpp's `llama-server` on a tiny model, a real inference engine.
- `keys`: keys files (TOML) for GPUGATE_KEYS_FILE.
- `wrk`: the load tool and its one Lua script.
- `stats`: percentiles, CPU time and RSS of a process (/proc).
- `revision`: the commit under test, for reports.
"""
