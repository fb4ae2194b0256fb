"""The counters of `GET /sim/stats`: inference requests by outcome, and model loads."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stats:
    """Counters of inference requests (generation and embeddings) and of model loads.

    A request is in flight from the moment its body is received until its answer is sent or
    its client goes away; it ends as exactly one of completed (whole answer sent), cancelled
    (client gone first) or failed (answered with an error status), so
    requests == in_flight + completed + cancelled + failed. `load_waiting` counts the requests
    waiting for their model to be loaded; `loads` the loads begun (`loads_by_model` by
    model), `evictions` the idle models unloaded to make room for another. With the
    performance model's prompt processing on, `prompt_tokens_cached` and
    `prompt_tokens_processed` count prompt tokens found in a slot's cache and processed
    (`prompt_cache_hits` the prompts that found any); `out_of_memory` the requests refused
    past `max_generations`.
    """

    in_flight: int = 0
    max_in_flight: int = 0
    running: int = 0
    max_running: int = 0
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    load_waiting: int = 0
    loads: int = 0
    evictions: int = 0
    loads_by_model: dict[str, int] = field(default_factory=dict)
    prompt_cache_hits: int = 0
    prompt_tokens_cached: int = 0
    prompt_tokens_processed: int = 0
    out_of_memory: int = 0

    def enter(self) -> None:
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self, outcome: str) -> None:
        self.in_flight -= 1
        setattr(self, outcome, getattr(self, outcome) + 1)

    def count_load(self, name: str) -> None:
        self.loads += 1
        self.loads_by_model[name] = self.loads_by_model.get(name, 0) + 1

    def count_prompt(self, cached: int, processed: int) -> None:
        self.prompt_cache_hits += cached > 0
        self.prompt_tokens_cached += cached
        self.prompt_tokens_processed += processed

    def reset(self) -> None:
        """Zero the totals; the maxima restart from the current gauges (0 when idle)."""
        self.requests = self.completed = self.cancelled = self.failed = 0
        self.loads = self.evictions = 0
        self.prompt_cache_hits = self.prompt_tokens_cached = self.prompt_tokens_processed = 0
        self.out_of_memory = 0
        self.loads_by_model = {}
        self.max_in_flight = self.in_flight
        self.max_running = self.running
