"""The models this instance has: their made-up layers, sizes and /api/show details."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gpugate.sim.golang import go_number, rfc3339
from gpugate.sim.names import blob_digest, blob_path, display_name

EMBEDDING_LENGTH = 384
CONTEXT_LENGTH = 4096


MODEL_LAYER = "application/vnd.ollama.image.model"
TEMPLATE_LAYER = "application/vnd.ollama.image.template"
SYSTEM_LAYER = "application/vnd.ollama.image.system"
PARAMS_LAYER = "application/vnd.ollama.image.params"
LICENSE_LAYER = "application/vnd.ollama.image.license"
MESSAGES_LAYER = "application/vnd.ollama.image.messages"
CONFIG_LAYER = "application/vnd.docker.container.image.v1+json"
DEFAULT_TEMPLATE = "{{ .Prompt }}"
DEFAULT_PARAMETERS: tuple[tuple[str, Any], ...] = (("stop", "<|eot_id|>"),)
_EMBEDDING_NAMES = ("embed", "minilm", "bge-")


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int

    @classmethod
    def of(cls, media_type: str, content: str) -> Layer:
        data = content.encode()
        return cls(media_type, blob_digest(data), len(data))


def config_layer(layers: tuple[Layer, ...]) -> Layer:
    return Layer.of(CONFIG_LAYER, json.dumps([layer.digest for layer in layers]))


@dataclass(frozen=True)
class SimModel:
    name: str
    family: str
    parameter_size: str
    parameter_count: int
    digest: str
    modified_at: datetime
    layers: tuple[Layer, ...]
    embedding: bool = False
    parent_model: str = ""
    template: str = DEFAULT_TEMPLATE
    system: str = ""
    parameters: tuple[tuple[str, Any], ...] = DEFAULT_PARAMETERS
    license: str = ""

    @classmethod
    def describe(cls, name: str, modified_at: datetime) -> SimModel:
        """A model as pulled: its size made up from the tag (`:1b`, `:135m`), 3.2B if none."""
        name = display_name(name)
        digest = hashlib.sha256(name.encode()).hexdigest()
        base, _, tag = name.rsplit("/", 1)[-1].partition(":")
        embedding = any(mark in base.lower() for mark in _EMBEDDING_NAMES)
        family_match = re.match(r"[a-z]+", base.lower())
        count = _parameter_count(tag, 0.137e9 if embedding else 3.2e9)
        small = (
            Layer.of(TEMPLATE_LAYER, DEFAULT_TEMPLATE),
            Layer.of(PARAMS_LAYER, json.dumps(dict(DEFAULT_PARAMETERS))),
        )
        size = int(count * 0.6) + int(digest[:6], 16) - sum(layer.size for layer in small)
        layers = (Layer(MODEL_LAYER, blob_digest(f"model {name}".encode()), size), *small)
        return cls(
            name=name,
            family=family_match.group(0) if family_match else "llama",
            parameter_size=f"{count / 1e9:g}B" if count >= 1e9 else f"{count / 1e6:g}M",
            parameter_count=int(count),
            digest=digest,
            modified_at=modified_at,
            layers=(*layers, config_layer(layers)),
            embedding=embedding,
        )

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": self.parent_model,
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": "Q4_K_M",
        }

    def tag_entry(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": rfc3339(self.modified_at),
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }

    def ps_entry(self, expires_at: datetime) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.name,
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
            "expires_at": rfc3339(expires_at),
            "size_vram": self.size,
            "context_length": CONTEXT_LENGTH,
        }

    def show(self) -> dict[str, Any]:
        texts = {
            "license": self.license,
            "modelfile": self.modelfile(),
            "parameters": self.parameter_text(),
            "template": self.template,
            "system": self.system,
        }
        return {
            **{key: text for key, text in texts.items() if text},  # Go's omitempty
            "details": self.details(),
            "model_info": {
                "general.architecture": self.family,
                "general.parameter_count": self.parameter_count,
                f"{self.family}.context_length": 131072,
                f"{self.family}.embedding_length": EMBEDDING_LENGTH,
            },
            "capabilities": ["embedding"] if self.embedding else ["completion"],
            "modified_at": rfc3339(self.modified_at),
        }

    def parameter_values(self) -> list[tuple[str, Any]]:
        """(name, value) pairs, one a value of a list (like `stop`)."""
        pairs = []
        for key, value in self.parameters:
            pairs += [(key, item) for item in (value if isinstance(value, list) else [value])]
        return pairs

    def parameter_text(self) -> str:
        """/api/show's `parameters`: Ollama's `%-30s %#v` lines."""
        values = self.parameter_values()
        return "\n".join(
            f"{k:<30} {json.dumps(go_number(v), ensure_ascii=False)}" for k, v in values
        )

    def modelfile(self) -> str:
        model_blob = next(layer for layer in self.layers if layer.media_type == MODEL_LAYER)
        lines = [
            '# Modelfile generated by "ollama show"',
            "# To build a new Modelfile based on this, replace FROM with:",
            f"# FROM {self.name}",
            "",
            f"FROM {blob_path(model_blob.digest)}",
            f'TEMPLATE """{self.template}"""',
        ]
        if self.system:
            lines.append(f'SYSTEM """{self.system}"""')
        lines += [f"PARAMETER {key} {value}" for key, value in self.parameter_values()]
        if self.license:
            lines.append(f'LICENSE """{self.license}"""')
        return "\n".join(lines) + "\n"


def _parameter_count(tag: str, default: float) -> float:
    match = re.search(r"(\d+(?:\.\d+)?)([bm])\b", tag.lower())
    if match is None:
        return default
    return float(match.group(1)) * (1e9 if match.group(2) == "b" else 1e6)
