"""gpugate's one Redis layer: every connection to Redis is made here.

- `url`: the URL forms (`redis://`, `rediss://`, `unix://`, `redis+sentinel://`), with
  their TLS and AUTH options.
- `store`: redis-py clients for everything but the admission path's scripts
  (`connect`), one connection-and-Sentinel policy, the one error mapper
  (`redis_errors`: a lost connection, a timeout or an error reply such as OOM, READONLY,
  LOADING, BUSY or NOPERM becomes `RedisUnavailable`), and the one way gpugate's Lua runs
  (`fcall`: its function library loaded where it is missing).
- `lane`: the pipelined connection of the scripts on the hot path (`Lane`), discovering
  the master as `store` does, and Redis WAIT (`Lane.wait_replicas`).

The scripts themselves, typed, are `shared/scripts.py`; every key, `shared/keys.py`.
"""
