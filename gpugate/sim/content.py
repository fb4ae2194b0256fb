"""What the simulator says: reply tokens and embeddings, functions of the request only."""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import struct

from gpugate.sim.models import EMBEDDING_LENGTH
from gpugate.sim.names import model_key

_WORDS = (
    "the sky is blue because light from sun scatters in air and short waves bend more "
    "so we see color across day while night sky turns dark with stars that shine far "
    "away beyond moon over sea where wind moves clouds past hills into cold quiet rain"
).split()


def reply_tokens(model: str, material: str, count: int) -> list[str]:
    """The reply's tokens: a function of (model, request material) only."""
    text = f"{model_key(model)}\x00{material}"
    seed = hashlib.sha256(text.encode(errors="surrogatepass")).digest()
    tokens = []
    for index in range(count):
        digest = hashlib.sha256(seed + index.to_bytes(4, "big")).digest()
        word = _WORDS[int.from_bytes(digest[:4], "big") % len(_WORDS)]
        tokens.append(word if index == 0 else f" {word}")
    return tokens


def count_tokens(text: str) -> int:
    return len(text.split())


def fake_context(material: str, length: int) -> list[int]:
    seed = hashlib.sha256(material.encode(errors="surrogatepass")).digest()
    return [(seed[i % 32] * 521 + i * 7919) % 128000 for i in range(length)]


def _float32(values: list[float]) -> tuple[float, ...]:
    return struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *values))


def _unit(values: list[float]) -> tuple[float, ...]:
    norm = max(math.sqrt(sum(value * value for value in values)), 1e-12)
    return _float32([value / norm for value in values])


@functools.lru_cache(maxsize=1024)
def embedding(model: str, text: str, dimensions: int = 0) -> tuple[float, ...]:
    """The unit vector of (model, text) as float32 values; `dimensions` (0 < d < 384) cuts
    it to its first d values and normalises it again, as Ollama does."""
    seed = hashlib.sha256(f"{model_key(model)}\x00{text}".encode(errors="surrogatepass")).digest()
    raw: list[float] = []
    for block in range(EMBEDDING_LENGTH // 8):
        words = struct.unpack(">8I", hashlib.sha256(seed + block.to_bytes(4, "big")).digest())
        raw.extend(word / 2**31 - 1.0 for word in words)
    vector = _unit(raw)
    if 0 < dimensions < len(vector):
        vector = _unit(list(vector[:dimensions]))
    return vector


def _shortest_float32(values: tuple[float, ...]) -> tuple[float, ...]:
    """Floats whose reprs are the shortest texts naming these float32 values, as Go prints
    a []float32 (each value gets the fewest digits, from 6 to 9, that still name it)."""
    result = list(values)
    todo = list(range(len(values)))
    for digits in range(6, 10):
        candidates = [float(f"{values[i]:.{digits}g}") for i in todo]
        exact = _float32(candidates)
        missed = []
        for i, candidate, rounded in zip(todo, candidates, exact, strict=True):
            if rounded == values[i]:
                result[i] = candidate
            else:
                missed.append(i)
        todo = missed
    return tuple(result)


@functools.lru_cache(maxsize=1024)
def embedding_json(model: str, text: str, dimensions: int = 0) -> tuple[float, ...]:
    """`embedding()` as Ollama's JSON writes a []float32."""
    return _shortest_float32(embedding(model, text, dimensions))


def embedding_base64(vector: tuple[float, ...]) -> str:
    """OpenAI's `encoding_format: base64`: the little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
