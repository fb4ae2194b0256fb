"""The performance model: a GPU under load, and the prompt cache of its slots.

Off by default (`knee` 0, `prompt_token_s` 0, `max_generations` 0): every token takes
`token_delay_s` and a prompt takes no time, whatever runs beside it. Each part turns on
by itself, from the command line or live with `PUT /sim/config`:

- **time per output token** (`knee` K > 0): `token_delay_s` x max(1, n / K), n the
  generations holding a slot at that token (a prompt being processed counts). Total tokens/s,
  n / that time, rises with n up to K / `token_delay_s` and stays there: the knee.
- **prompt processing** (`prompt_token_s` > 0): `prompt_token_s` x the *uncached* prompt
  tokens x the same max(1, n / K), before the first token: `prompt_eval_duration`.
- **the prompt cache** (with prompt processing): each of the `parallel` slots remembers, per
  model, the tokens of the last prompt it processed and of the reply it generated. A request
  takes, among the *free* slots, the one whose cache shares the longest prefix with its
  prompt if that is more than a tenth of the prompt (llama.cpp's slot choice, its
  `--slot-prompt-similarity` 0.1), else the least recently used free slot, and pays only
  for what its slot's cache does not hold, at least one token (llama.cpp and Ollama
  re-evaluate the last one for its logits). A busy slot's cache helps no one; a request
  cancelled during its prompt leaves its slot empty; unloading a model drops its caches.
- **out of memory** (`max_generations` M > 0): a request that would be the (M+1)th
  generation at once answers 503 `out of memory` (a `parallel` set beyond what the card
  holds), at once, in the API's error shape.

Tokens are words, as everywhere in the simulator: a prompt's tokens are its whitespace-
separated words; a chat message adds 4 (`<|im_start|>`, its role, a newline, `<|im_end|>`),
a generate prompt 1 (`<s>`), so a fresh prompt's uncached tokens are its `prompt_eval_count`.
A reply is cached behind `<|im_start|> assistant` and a newline, so the next turn of a chat
(the same messages, the reply, a new message) finds its whole history cached.

`CALIBRATED` holds the values measured on llama.cpp's `llama-server` (`python -m bench
engine-curve`, BENCHMARKS.md); `gpugate sim --calibrated` starts with them.

Where a real engine differs (BENCHMARKS.md, "engine-curve"): its time per token has no flat
part on a CPU (it grows from the second stream on, and its tokens/s approach the plateau
gradually; a GPU's knee is sharper); its prompt time also grows with attention over the
prompt; a long prompt being processed slows the others' tokens more than one generation's
worth (llama.cpp batches prompt chunks with their tokens); the contention a prompt sees is
fixed when it starts here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from gpugate.sim.apis import ApiError
from gpugate.sim.config import SimConfig
from gpugate.sim.messages import material_tokens
from gpugate.sim.names import model_key
from gpugate.sim.stats import Stats


@dataclass
class PerformanceConfig:
    """The model's parameters; all change live (`PUT /sim/config`)."""

    knee: int = 0  # 0: time per token does not grow with concurrency
    prompt_token_s: float = 0.0  # 0: prompts take no time (and the cache is not kept)
    max_generations: int = 0  # 0: no limit but `parallel`


CALIBRATED: dict[str, float | int] = {
    "token_delay_s": 0.006,
    "knee": 2,
    "prompt_token_s": 0.0017,
}
"""The defaults set from llama-server's measured curve (`python -m bench engine-curve`: one
thread, `--parallel 16`, the bench's "small" random-weight model, 8 layers x 512, on a
shared 2-core machine): its time per output token alone (6.2 ms), the knee where
n / that time meets its best total tokens/s (~300 tok/s: 1.8, so 2), and its prompt time
per token (1.75 ms, `timings.prompt_ms` / `prompt_n` of a fresh 964-token prompt). The
tiny model of the tests (0.5 ms a token) is too fast for the clients and the simulator to
follow; BENCHMARKS.md has both curves."""


_LIVE_FIELDS: dict[str, tuple[type, ...]] = {
    "knee": (int,),
    "prompt_token_s": (int, float),
    "max_generations": (int,),
}
FIELDS = frozenset(_LIVE_FIELDS)


def updated_performance(config: PerformanceConfig, changes: Mapping[str, Any]) -> PerformanceConfig:
    """`config` with `changes` (only its own keys) applied; ValueError for a bad value."""
    values = asdict(config)
    for key, value in changes.items():
        kinds = _LIVE_FIELDS[key]
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"{key} has the wrong type")
        values[key] = value
    new = PerformanceConfig(**values)
    validate_performance(new)
    return new


def validate_performance(config: PerformanceConfig) -> None:
    if config.knee < 0:
        raise ValueError("knee must be >= 0 (0: off)")
    if not (config.prompt_token_s >= 0 and math.isfinite(config.prompt_token_s)):
        raise ValueError("prompt_token_s must be a finite number >= 0")
    if config.max_generations < 0:
        raise ValueError("max_generations must be >= 0 (0: no limit)")


@dataclass
class CacheSlot:
    """One slot's prompt cache: the tokens it last processed, for one model as loaded then
    (`runner`: a cache does not survive its model's unloading)."""

    model: str = ""
    runner: object = None
    tokens: list[str] = field(default_factory=list)
    busy: bool = False
    last_used: float = 0.0


def common_prefix(a: list[str], b: list[str]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


REPLY_MARKERS = ["<|im_start|>", "assistant", "\n"]

SIMILARITY = 0.1
"""llama.cpp's `--slot-prompt-similarity` default: a free slot is chosen for its cache when
the prefix it shares is more than this part of the prompt; else the least recently used."""


class PromptCache:
    """The slots' caches; a request takes the free one holding its longest prefix."""

    def __init__(self) -> None:
        self.slots: list[CacheSlot] = []

    def take(
        self, model: str, runner: object, tokens: list[str], parallel: int
    ) -> tuple[CacheSlot, int]:
        """A free slot for a prompt, and how many of its tokens that slot has cached."""
        self._resize(parallel)
        free = [slot for slot in self.slots if not slot.busy]
        if not free:  # `parallel` shrank under running requests
            free = [CacheSlot()]
            self.slots.extend(free)

        def match(slot: CacheSlot) -> int:
            if slot.model != model or slot.runner is not runner:
                return 0
            return common_prefix(slot.tokens, tokens)

        similar = [slot for slot in free if match(slot) > SIMILARITY * len(tokens)]
        if similar:
            best = max(similar, key=match)
        else:  # the least recently used (an empty one first)
            best = min(free, key=lambda slot: slot.last_used)
        best.busy = True
        return best, match(best)

    def give_back(self, slot: CacheSlot, model: str, runner: object, tokens: list[str]) -> None:
        slot.model, slot.runner, slot.tokens = model, runner, tokens
        slot.busy = False
        slot.last_used = time.monotonic()

    def clear(self) -> None:
        """Forget every free slot's cache (a busy one keeps its prompt when it ends)."""
        self.slots = [slot for slot in self.slots if slot.busy]

    def _resize(self, parallel: int) -> None:
        if len(self.slots) < parallel:
            self.slots.extend(CacheSlot() for _ in range(parallel - len(self.slots)))
        while len(self.slots) > parallel and not self.slots[-1].busy:
            self.slots.pop()

    def listed(self) -> list[dict[str, Any]]:
        return [
            {"model": slot.model, "cached_tokens": len(slot.tokens), "busy": slot.busy}
            for slot in self.slots
        ]


class Generation:
    """One request on the GPU, from its slot to its last token: how long each step takes."""

    def __init__(
        self,
        model: Performance,
        key: str = "",
        runner: object = None,
        prompt: list[str] | None = None,
        slot: CacheSlot | None = None,
        cached: int = 0,
    ) -> None:
        self._model = model
        self._key = key
        self._runner = runner
        self._prompt = prompt or []
        self._slot = slot
        self._reply: list[str] | None = None  # None until the prompt is processed
        self.cached_tokens = min(cached, len(self._prompt) - 1) if self._prompt else 0
        self.uncached_tokens = max(1, len(self._prompt) - self.cached_tokens) if slot else 0

    def prompt_s(self) -> float:
        """Seconds to process the prompt's uncached tokens, at today's contention."""
        config = self._model.config()
        return config.prompt_token_s * self.uncached_tokens * self._model.contention()

    def prompt_done(self) -> None:
        self._reply = []

    def token_s(self) -> float:
        """Seconds for the next output token, at today's contention."""
        return self._model.sim_config().token_delay_s * self._model.contention()

    def generated(self, token: str) -> None:
        if self._reply is not None:
            self._reply.extend(token.split())

    def finish(self) -> None:
        """Give the slot back, caching the prompt and reply (nothing if cut mid-prompt)."""
        if self._slot is None:
            return
        cached = [] if self._reply is None else [*self._prompt, *REPLY_MARKERS, *self._reply]
        self._model.cache.give_back(self._slot, self._key, self._runner, cached)
        self._slot = None


class Performance:
    """The performance model of one simulator: its parameters, contention and slot caches."""

    def __init__(
        self,
        config: Callable[[], PerformanceConfig],
        sim_config: Callable[[], SimConfig],
        stats: Stats,
        runner: Callable[[str], object],
    ) -> None:
        """`runner(key)`: the model as loaded now (what its slots' caches belong to)."""
        self.config = config
        self.sim_config = sim_config
        self._runner = runner
        self._stats = stats
        self.cache = PromptCache()

    def contention(self) -> float:
        """max(1, n / knee): how much slower each step is with n generations running."""
        knee = self.config().knee
        return max(1.0, self._stats.running / knee) if knee else 1.0

    def start(self, model: str, material: str) -> Generation:
        """A request that holds a slot begins: 503 past `max_generations`, else its slot's
        cache is looked up (when prompts take time)."""
        config = self.config()
        limit = config.max_generations
        if limit and self._stats.running > limit:
            self._stats.out_of_memory += 1
            running = self._stats.running - 1
            raise ApiError(503, f"out of memory: {running} generations running, room for {limit}")
        if not config.prompt_token_s or not material:  # embeddings have no material
            return Generation(self)
        key = model_key(model)
        tokens = material_tokens(material)
        runner = self._runner(key)
        slot, cached = self.cache.take(key, runner, tokens, self.sim_config().parallel)
        generation = Generation(self, key, runner, tokens, slot, cached)
        self._stats.count_prompt(generation.cached_tokens, generation.uncached_tokens)
        return generation

    def listed(self) -> dict[str, Any]:
        """`GET /sim/performance`: the parameters, the contention now, the slots' caches."""
        return {
            **asdict(self.config()),
            "running": self._stats.running,
            "contention": self.contention(),
            "slots": self.cache.listed(),
        }
