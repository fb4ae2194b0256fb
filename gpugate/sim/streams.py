"""Reply formats, streamed: NDJSON, OpenAI's SSE chunks, Responses events, Anthropic events."""

from __future__ import annotations

import random
import time
from typing import Any

from gpugate.sim.answers import (
    Result,
    anthropic_usage,
    message_item,
    native_final,
    native_piece,
    openai_final_events,
    openai_piece,
    output_text,
    responses_object,
    responses_usage,
    stop_reason,
)
from gpugate.sim.apis import NDJSON_TYPE, SSE_TYPE, Api
from gpugate.sim.golang import encode_json, encode_sorted
from gpugate.sim.requests import Job


def sse_data(value: Any) -> bytes:
    return b"data: " + encode_json(value) + b"\n\n"


def sse_event(kind: str, data: bytes) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


class StreamFormat:
    """How a streamed answer is framed: its content type, each token's bytes, the last
    chunks. This one is Ollama's NDJSON."""

    content_type = NDJSON_TYPE

    def __init__(self, job: Job) -> None:
        self.job = job

    def piece(self, token: str) -> bytes:
        return encode_json(native_piece(self.job, token)) + b"\n"

    def end(self, result: Result) -> list[bytes]:
        return [encode_json(native_final(self.job, result, "")) + b"\n"]


class OpenAIStream(StreamFormat):
    """Chat completion or completion chunks, then `[DONE]`."""

    content_type = SSE_TYPE

    def piece(self, token: str) -> bytes:
        return sse_data(openai_piece(self.job, token))

    def end(self, result: Result) -> list[bytes]:
        return [*map(sse_data, openai_final_events(self.job, result)), b"data: [DONE]\n\n"]


class ResponsesStream(StreamFormat):
    """openai.ResponsesStreamConverter: named events, each with its `sequence_number`."""

    content_type = SSE_TYPE

    def __init__(self, job: Job) -> None:
        super().__init__(job)
        self._sequence = 0
        self._started = False
        self._text: str | None = None  # None until the first text
        self._item = f"msg_{random.randrange(999999)}"

    def _event(self, kind: str, data: dict[str, Any]) -> bytes:
        data = {**data, "type": kind, "sequence_number": self._sequence}
        self._sequence += 1
        return sse_event(kind, encode_sorted(data))

    def _opening(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        response = responses_object(self.job, "in_progress", [], None, stream=True)
        kinds = ("response.created", "response.in_progress")
        return [self._event(kind, {"response": response}) for kind in kinds]

    def _where(self) -> dict[str, Any]:
        return {"item_id": self._item, "output_index": 0, "content_index": 0}

    def piece(self, token: str) -> bytes:
        events = self._opening()
        if self._text is None:
            self._text = ""
            item = {"output_index": 0, "item": message_item(self._item, None, "in_progress")}
            events.append(self._event("response.output_item.added", item))
            part = {**self._where(), "part": output_text("")}
            events.append(self._event("response.content_part.added", part))
        self._text += token
        delta = {**self._where(), "delta": token, "logprobs": []}
        events.append(self._event("response.output_text.delta", delta))
        return b"".join(events)

    def end(self, result: Result) -> list[bytes]:
        events = self._opening()
        output = []
        if self._text is not None:
            text = {**self._where(), "text": self._text, "logprobs": []}
            events.append(self._event("response.output_text.done", text))
            part = {**self._where(), "part": output_text(self._text)}
            events.append(self._event("response.content_part.done", part))
            item = message_item(self._item, self._text, "completed")
            events.append(
                self._event("response.output_item.done", {"output_index": 0, "item": item})
            )
            output = [item]
        usage = responses_usage(self.job, result)
        response = responses_object(self.job, "completed", output, usage, stream=True)
        response["completed_at"] = int(time.time())
        events.append(self._event("response.completed", {"response": response}))
        return events


class AnthropicStream(StreamFormat):
    """anthropic.StreamConverter: message_start, one text block, message_delta, message_stop."""

    content_type = SSE_TYPE

    def __init__(self, job: Job) -> None:
        super().__init__(job)
        self._started = False
        self._text_started = False

    @staticmethod
    def _event(value: dict[str, Any]) -> bytes:
        return sse_event(value["type"], encode_json(value))

    def _opening(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        message = {
            "id": self.job.request_id,
            "type": "message",
            "role": "assistant",
            "model": self.job.model,
            "content": [],
            "usage": {"input_tokens": self.job.prompt_tokens, "output_tokens": 0},
        }
        return [self._event({"type": "message_start", "message": message})]

    def piece(self, token: str) -> bytes:
        events = self._opening()
        if not self._text_started:
            self._text_started = True
            block = {"type": "text", "text": ""}
            events.append(
                self._event({"type": "content_block_start", "index": 0, "content_block": block})
            )
        delta = {"type": "text_delta", "text": token}
        events.append(self._event({"type": "content_block_delta", "index": 0, "delta": delta}))
        return b"".join(events)

    def end(self, result: Result) -> list[bytes]:
        events = self._opening()
        if self._text_started:
            events.append(self._event({"type": "content_block_stop", "index": 0}))
        reason = stop_reason(result.done_reason)
        delta = {"stop_reason": reason} if reason else {}
        usage = anthropic_usage(self.job, result)
        events.append(self._event({"type": "message_delta", "delta": delta, "usage": usage}))
        events.append(self._event({"type": "message_stop"}))
        return events


_STREAM_FORMATS: dict[Api, type[StreamFormat]] = {
    Api.OPENAI_CHAT: OpenAIStream,
    Api.OPENAI_COMPLETION: OpenAIStream,
    Api.OPENAI_RESPONSES: ResponsesStream,
    Api.ANTHROPIC_MESSAGES: AnthropicStream,
}


def stream_format(job: Job) -> StreamFormat:
    return _STREAM_FORMATS.get(job.api, StreamFormat)(job)
