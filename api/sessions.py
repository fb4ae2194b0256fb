"""A request's session (SPEC "The operating point"): its `X-Session-Id`, else, on the chat
APIs, its model, system prompt and first user message — what stays the same from one
turn of a conversation to the next. Dispatch keeps a session's jobs on the backend that
ran its last one while that backend frees a slot soon (lib/schedule.lua), so the backend's
prompt cache for the conversation's common prefix is used again.

The session is a digest (never the text of a prompt): at most one per request, in the
job record and as a short-lived key naming its backend.
"""

from __future__ import annotations

import hashlib
from typing import Any

from starlette.datastructures import Headers

from api.bodies import Inference

SESSION_HEADER = "x-session-id"
CHAT_APIS = frozenset({"/api/chat", "/v1/chat/completions", "/v1/messages"})


def session_of(endpoint: str, body: Inference, headers: Headers) -> str:
    """The request's session, as a digest; "" when it has none."""
    given = headers.get(SESSION_HEADER)
    if given:
        return _digest("header", given)
    if endpoint not in CHAT_APIS:
        return ""
    fields = {**(body.model_extra or {}), **body.__dict__}
    messages = fields.get("messages") or []
    system = fields.get("system")  # Anthropic's Messages: top level
    first_user = None
    for message in messages if isinstance(messages, list) else []:
        if not isinstance(message, dict):
            continue
        if message.get("role") == "system" and system is None:
            system = message.get("content")
        elif message.get("role") == "user":
            first_user = message.get("content")
            break
    if first_user is None:
        return ""
    return _digest("chat", body.model, _text(system), _text(first_user))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]
