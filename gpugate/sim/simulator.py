"""The Simulator: the state every route shares, and the questions they ask of it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from gpugate.sim.config import SimConfig, updated_config, validate_config
from gpugate.sim.models import SimModel
from gpugate.sim.names import model_key
from gpugate.sim.performance import (
    FIELDS,
    Performance,
    PerformanceConfig,
    updated_performance,
    validate_performance,
)
from gpugate.sim.residency import Residency
from gpugate.sim.slots import SlotGate
from gpugate.sim.stats import Stats


class Simulator:
    """The state behind the app: config, counters, slots, models, loaded models, blobs."""

    def __init__(self, config: SimConfig, performance: PerformanceConfig | None = None) -> None:
        validate_config(config)
        self.config = config
        self.performance_config = performance or PerformanceConfig()
        validate_performance(self.performance_config)
        self.stats = Stats()
        self.slots = SlotGate(lambda: self.config.parallel, self.stats)
        started = datetime.now(UTC)
        described = (SimModel.describe(name, started) for name in config.models)
        self.models = {model_key(model.name): model for model in described}
        self.residency = Residency(lambda: self.config, self.stats)
        self.blobs: dict[str, int] = {}
        self.performance = Performance(
            lambda: self.performance_config,
            lambda: self.config,
            self.stats,
            lambda key: self.residency.resident.get(key),
        )

    def running_models(self) -> list[dict[str, Any]]:
        """/api/ps: the loaded models, the longest left to live first."""
        entries = self.residency.listed()
        entries.sort(key=lambda entry: entry[0], reverse=True)
        return [model.ps_entry(expires_at) for expires_at, model in entries]

    def find_model(self, name: str) -> SimModel | None:
        return self.models.get(model_key(name)) if name.strip() else None

    def has_blob(self, digest: str) -> bool:
        digest = digest.replace("-", ":", 1)
        if digest in self.blobs:
            return True
        return any(layer.digest == digest for m in self.models.values() for layer in m.layers)

    def snapshot(self) -> dict[str, Any]:
        return {**asdict(self.stats), "waiting": self.slots.waiting, "config": asdict(self.config)}

    def settings(self) -> dict[str, Any]:
        """What `PUT /sim/config` answers: every live setting, the performance model's too."""
        return {**asdict(self.config), **asdict(self.performance_config)}

    def reconfigure(self, changes: Mapping[str, Any]) -> None:
        """Apply `changes` (all or none: ValueError names the first bad one)."""
        own = {key: value for key, value in changes.items() if key in FIELDS}
        rest = {key: value for key, value in changes.items() if key not in FIELDS}
        config = updated_config(self.config, rest)
        self.performance_config = updated_performance(self.performance_config, own)
        self.config = config
        if not self.performance_config.prompt_token_s:
            self.performance.cache.clear()  # prompts take no time: no cache is kept
        self.slots.wake()
        self.residency.trim()
