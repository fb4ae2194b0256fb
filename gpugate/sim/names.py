"""Model names as Ollama reads them: matching, parts, validity, and paths on disk."""

from __future__ import annotations

import hashlib
from typing import Any


def model_key(name: str) -> str:
    """How Ollama matches names: case-insensitive, the tag defaulting to `latest`."""
    return display_name(name).lower()


def display_name(name: str) -> str:
    name = name.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


_NAME_CHARS = {"host": "_-.:", "namespace": "_-", "model": "_-.", "tag": "_-."}


def name_parts(name: str) -> dict[str, str] | None:
    """Host, namespace, model and tag of a name, Ollama's defaults filled in; None if it has
    more parts than host/namespace/model:tag."""
    rest, colon, tag = name.split("@", 1)[0].rpartition(":")
    if not colon or "/" in tag:  # no tag, or the colon was a host's port
        rest, tag = name.split("@", 1)[0], "latest"
    parts = rest.split("/")
    if len(parts) > 3:
        return None
    defaults = ["registry.ollama.ai", "library"][: 3 - len(parts)]
    host, namespace, model = [*defaults, *parts]
    return {"host": host, "namespace": namespace, "model": model, "tag": tag}


def valid_model_name(name: Any) -> bool:
    """Ollama's model.ParseName(name).IsValid(): at most host/namespace/model:tag, each part
    starting with a letter, digit or `_` and made of those and a few marks."""
    parts = name_parts(name) if isinstance(name, str) and name else None
    if parts is None:
        return False
    for kind, marks in _NAME_CHARS.items():
        part = parts[kind]
        if not 1 <= len(part) <= (350 if kind == "host" else 80):
            return False
        if not (part[0].isascii() and (part[0].isalnum() or part[0] == "_")):
            return False
        if any(not (c.isascii() and (c.isalnum() or c in marks)) for c in part):
            return False
    return True


def manifest_path(name: str) -> str:
    parts = name_parts(name) or {"host": "", "namespace": "", "model": name, "tag": ""}
    return "/root/.ollama/models/manifests/{host}/{namespace}/{model}/{tag}".format(**parts)


def blob_path(digest: str) -> str:
    return f"/root/.ollama/models/blobs/{digest.replace(':', '-')}"


def blob_digest(content: bytes) -> str:
    return "sha256:" + hashlib.sha256(content).hexdigest()
