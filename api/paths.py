"""The path a request is for, as the routes see it: without the `root_path` a server
(uvicorn --root-path, a proxy's prefix) may have put in front. Every check of a path
(the edge's inference routes, the body limit's blob uploads, the relay to Ollama) uses
this, so a prefix never changes what a path means."""

from __future__ import annotations

from starlette.types import Scope


def without_root(scope: Scope, path: str) -> str:
    """`path` (the scope's `path`, or its raw form) without the scope's `root_path`."""
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def route_path(scope: Scope) -> str:
    """The decoded path the routes match."""
    return without_root(scope, scope["path"])
