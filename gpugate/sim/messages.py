"""The text of what a request carries: chat messages, content parts, Responses input items."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gpugate.sim.apis import INVALID_REQUEST, ApiError
from gpugate.sim.content import count_tokens
from gpugate.sim.golang import go_json_type


def message_text(content: Any) -> str:
    """Text of a message's content: a string, or OpenAI/Anthropic content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part_text(part) for part in content if isinstance(part, dict))
    return ""


def part_text(part: Mapping[str, Any]) -> str:
    if part.get("type") == "tool_use":
        return f"{part.get('name', '')}{json.dumps(part.get('input'), sort_keys=True)}"
    if part.get("type") == "tool_result":
        return message_text(part.get("content"))
    text = part.get("text", "")
    return text if isinstance(text, str) else ""


def chat_material(messages: list[Any]) -> tuple[str, int]:
    """Hash material and prompt token count of a list of chat messages."""
    pairs = []
    for message in messages:
        if not isinstance(message, dict):
            raise ApiError(400, "invalid message format", INVALID_REQUEST)
        pairs.append((str(message.get("role", "")), message_text(message.get("content"))))
    material = json.dumps(pairs, ensure_ascii=False)
    return material, sum(count_tokens(text) + 4 for _, text in pairs)


def prompt_material(system: str, prompt: str, suffix: str) -> tuple[str, int]:
    material = json.dumps(["prompt", system, prompt, suffix], ensure_ascii=False)
    return material, count_tokens(system) + count_tokens(prompt) + count_tokens(suffix) + 1


def material_tokens(material: str) -> list[str]:
    """The prompt tokens of a request's material, for the prompt cache: words, with
    `<|im_start|>`, the role, a newline and `<|im_end|>` around each chat message, and `<s>`
    before a generate prompt (as many as `chat_material`/`prompt_material` count)."""
    value = json.loads(material)
    if value and value[0] == "prompt":
        return ["<s>", *(word for text in value[1:] for word in text.split())]
    tokens: list[str] = []
    for role, text in value:
        tokens += ["<|im_start|>", role, "\n", *text.split(), "<|im_end|>"]
    return tokens


def responses_input(value: Any) -> list[dict[str, Any]]:
    """The chat messages of a Responses `input`: a string, or a list of input items."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value else []
    if not isinstance(value, list):
        raise ApiError(
            400,
            "input must be a string or array: json: cannot unmarshal "
            f"{go_json_type(value)} into Go value of type []json.RawMessage",
            INVALID_REQUEST,
        )
    messages = []
    for index, item in enumerate(value):
        message = _responses_item(index, item)
        if message is not None:
            messages.append(message)
    return messages


def _responses_item(index: int, item: Any) -> dict[str, Any] | None:
    if not isinstance(item, dict):
        message = f"json: cannot unmarshal {go_json_type(item)} into Go value of type struct"
        raise ApiError(400, f"input[{index}]: {message}", INVALID_REQUEST)
    kind = item.get("type") or ("message" if item.get("role") else "")
    if kind == "message":
        text = _responses_content(index, item.get("content"))
        return {"role": str(item.get("role", "")), "content": text}
    if kind == "function_call":
        call = f"{item.get('name', '')}{item.get('arguments', '')}"
        return {"role": "assistant", "content": call}
    if kind == "function_call_output":
        return {"role": "tool", "content": message_text(item.get("output"))}
    if kind in ("reasoning", "web_search_call"):
        return None
    if not kind:
        message = f"input[{index}]: input item missing required 'type' field"
        raise ApiError(400, message, INVALID_REQUEST)
    raise ApiError(
        400, f"input[{index}]: unknown input item type: {json.dumps(kind)}", INVALID_REQUEST
    )


def _responses_content(index: int, content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        message = f"input[{index}]: content must be a string or array"
        raise ApiError(400, message, INVALID_REQUEST)
    texts = []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            texts.append(part_text(part))
        elif kind == "input_file":
            raise ApiError(400, "file inputs are not currently supported", INVALID_REQUEST)
        elif kind != "input_image":
            message = f"input[{index}]: content[{number}]: unknown content type: {kind or ''}"
            raise ApiError(400, message, INVALID_REQUEST)
    return "".join(texts)
