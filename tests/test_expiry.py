"""Per-key state expires (SPEC "Invariants"): a flood of distinct keys and addresses, each
seen once, leaves Redis no larger, once their buckets would be full again, than before
the flood — its keys, its memory, and the members of every hash, set, sorted set and
stream (the fair-share counters of keys with nothing waiting included)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import redis

from tests.conftest import StackFactory
from tests.processes import wait_until

GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}
FLOOD_KEYS = 1_000
FLOOD_ADDRESSES = 1_000
MEMORY_SLACK_BYTES = 256 << 10
"""Allocator and encoding noise in used_memory between two idle moments."""


def members(rdb: redis.Redis) -> dict[str, int]:
    """Every key of the database with its size (members, fields, entries; 1 for a string)."""
    sizes: dict[str, int] = {}
    for key in rdb.scan_iter(count=1000):
        kind = rdb.type(key).decode()
        size = {
            "hash": rdb.hlen,
            "set": rdb.scard,
            "zset": rdb.zcard,
            "list": rdb.llen,
            "stream": rdb.xlen,
        }.get(kind, lambda _: 1)(key)
        sizes[key.decode()] = int(size)
    return sizes


BOUNDED = ("gpugate:hist:", "gpugate:stats")
"""Fleet-wide counters whose fields are fixed (a histogram's buckets, counters by outcome):
they fill in as traffic comes, whoever sends it."""


def grown(before: dict[str, int], after: dict[str, int]) -> dict[str, tuple[int, int]]:
    return {
        k: (before.get(k, 0), n)
        for k, n in after.items()
        if n > before.get(k, 0) and not k.startswith(BOUNDED)
    }


def test_a_flood_of_one_off_keys_and_addresses_leaves_redis_no_larger(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(
        rate_limit="600/minute",  # burst 2: a bucket is full again 0.2 s after its request
        burst=2,
        result_ttl=1,  # the flood's job records go too (results are not per-key state)
        trusted_proxies="127.0.0.1/32",
        gpu_concurrency=8,
        worker_concurrency=8,
        max_queue_depth=1_000,
    )
    with stack.redis() as rdb:
        with stack.client("warm-up") as client:  # the fleet's own keys exist from here on
            assert client.post("/api/generate", json=GENERATE).status_code == 200
        wait_until(
            lambda: not list(rdb.scan_iter("gpugate:job:*")),
            timeout=10,
            what="the warm-up's job record to expire",
        )
        before = members(rdb)
        memory_before = int(rdb.info("memory")["used_memory"])

        def one_off(client: httpx.Client, i: int) -> int:
            if i < FLOOD_KEYS:
                headers = {"Authorization": f"Bearer flood-{i}"}
            else:
                headers = {"X-Forwarded-For": f"10.9.{i // 250}.{i % 250}"}
            return client.post("/api/generate", json=GENERATE, headers=headers).status_code

        limits = httpx.Limits(max_connections=16)
        with httpx.Client(base_url=stack.url, timeout=60, limits=limits) as client:
            with ThreadPoolExecutor(16) as pool:
                flood = range(FLOOD_KEYS + FLOOD_ADDRESSES)
                codes = list(pool.map(lambda i: one_off(client, i), flood))
        assert codes.count(200) == len(codes), {c: codes.count(c) for c in set(codes)}
        assert len(rdb.zrange("gpugate:vtc", 0, -1)) > 0  # the flood did leave counters

        left: dict[str, tuple[int, int]] = {}

        def back_to_baseline() -> bool:
            left.clear()
            left.update(grown(before, members(rdb)))
            return not left

        try:
            wait_until(back_to_baseline, timeout=30, interval=0.5, what="per-key state to expire")
        except AssertionError as exc:
            grown_sizes = dict(list(left.items())[:20])
            raise AssertionError(f"{exc}; grown (before, after): {grown_sizes}") from None
        assert rdb.zcard("gpugate:vtc") <= before.get("gpugate:vtc", 0)
        assert rdb.dbsize() <= len(before)
        memory_after = int(rdb.info("memory")["used_memory"])
        assert memory_after <= memory_before + MEMORY_SLACK_BYTES, (memory_before, memory_after)
