"""Reply formats, whole: the non-streamed answer of each API."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

from gpugate.sim.apis import JSON_TYPE, PLAIN_JSON_TYPE, Api
from gpugate.sim.content import embedding, embedding_base64, embedding_json, fake_context
from gpugate.sim.golang import encode_json, go_number, now_rfc3339
from gpugate.sim.requests import Job


@dataclass
class Result:
    """How a generation ended, for the final chunk or the whole answer."""

    text: str
    eval_count: int
    done_reason: str
    total_ns: int = 0
    load_ns: int = 0
    prompt_eval_ns: int = 0
    eval_ns: int = 0


def _metrics(job: Job, result: Result) -> dict[str, int]:
    return {
        "total_duration": max(1, result.total_ns),
        "load_duration": max(1, result.load_ns),
        "prompt_eval_count": job.prompt_tokens,
        "prompt_eval_duration": max(1, result.prompt_eval_ns),
        "eval_count": result.eval_count,
        "eval_duration": max(1, result.eval_ns),
    }


def _input_tokens(job: Job) -> int:
    return 0 if job.action else job.prompt_tokens


def native_piece(job: Job, token: str) -> dict[str, Any]:
    head = {"model": job.model, "created_at": now_rfc3339()}
    if job.api is Api.CHAT:
        return {**head, "message": {"role": "assistant", "content": token}, "done": False}
    return {**head, "response": token, "done": False}


def native_final(job: Job, result: Result, text: str) -> dict[str, Any]:
    """The last NDJSON object (`text` ""), or the whole non-streamed answer."""
    head: dict[str, Any] = {"model": job.model, "created_at": now_rfc3339()}
    metrics = {} if job.action else _metrics(job, result)
    if job.api is Api.CHAT:
        message = {"role": "assistant", "content": text}
        done = {"done_reason": result.done_reason, "done": True}
        return {**head, "message": message, **done, **metrics}
    done = {"done": True, "done_reason": result.done_reason}
    context = {} if job.action else {"context": _context(job, result)}
    return {**head, "response": text, **done, **context, **metrics}


def _context(job: Job, result: Result) -> list[int]:
    return fake_context(job.material + result.text, job.prompt_tokens + result.eval_count)


def _usage(job: Job, result: Result) -> dict[str, int]:
    prompt_tokens = _input_tokens(job)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": result.eval_count,
        "total_tokens": prompt_tokens + result.eval_count,
    }


def openai_head(job: Job, chunk: bool) -> dict[str, Any]:
    if job.api is Api.OPENAI_CHAT:
        kind = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        kind = "text_completion"
    return {"id": job.request_id, "object": kind, "created": int(time.time())}


def openai_choice(job: Job, text: str, finish_reason: str | None, chunk: bool) -> dict[str, Any]:
    if job.api is Api.OPENAI_COMPLETION:
        return {"text": text, "index": 0, "finish_reason": finish_reason}
    message = {"role": "assistant", "content": text}
    return {"index": 0, ("delta" if chunk else "message"): message, "finish_reason": finish_reason}


def openai_object(
    job: Job, choices: list[dict[str, Any]], chunk: bool, usage: dict[str, int] | None = None
) -> dict[str, Any]:
    tail = {"model": job.model, "system_fingerprint": "fp_ollama"}
    body = {**openai_head(job, chunk), **tail, "choices": choices}
    if job.api is Api.OPENAI_COMPLETION:  # Ollama's field order: choices before model
        body = {**openai_head(job, chunk), "choices": choices, **tail}
    return body if usage is None else {**body, "usage": usage}


def openai_piece(job: Job, token: str) -> dict[str, Any]:
    return openai_object(job, [openai_choice(job, token, None, chunk=True)], chunk=True)


def openai_final_events(job: Job, result: Result) -> list[dict[str, Any]]:
    """The last SSE objects: the finish_reason chunk, then the usage chunk if asked."""
    choice = openai_choice(job, "", result.done_reason, chunk=True)
    events = [openai_object(job, [choice], chunk=True)]
    if job.include_usage:
        events.append(openai_object(job, [], chunk=True, usage=_usage(job, result)))
    return events


def openai_whole(job: Job, result: Result) -> dict[str, Any]:
    choice = openai_choice(job, result.text, result.done_reason, chunk=False)
    return openai_object(job, [choice], chunk=False, usage=_usage(job, result))


def embedding_answer(job: Job, result: Result) -> dict[str, Any]:
    """/api/embed, /api/embeddings or /v1/embeddings (api.EmbedResponse, openai.ToEmbeddingList)."""
    if job.api is Api.EMBEDDINGS:  # []float64 of the float32 values
        return {"embedding": list(embedding(job.model, job.inputs[0])) if job.inputs else []}
    vectors = [embedding_json(job.model, text, job.dimensions) for text in job.inputs]
    if job.api is Api.EMBED:
        body: dict[str, Any] = {"model": job.model, "embeddings": [list(v) for v in vectors]}
        if job.action:  # nothing to embed: the model was only loaded, no metrics
            return body
        durations = {
            "total_duration": max(1, result.total_ns),
            "load_duration": max(1, result.load_ns),
        }
        return {**body, **durations, "prompt_eval_count": job.prompt_tokens}
    data = [
        {
            "object": "embedding",
            "embedding": embedding_base64(v) if job.as_base64 else list(v),
            "index": i,
        }
        for i, v in enumerate(vectors)
    ]
    usage = {"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens}
    return {"object": "list", "data": data, "model": job.model, "usage": usage}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [output_text(text)]
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def responses_usage(job: Job, result: Result) -> dict[str, Any]:
    prompt_tokens = _input_tokens(job)
    return {
        "input_tokens": prompt_tokens,
        "output_tokens": result.eval_count,
        "total_tokens": prompt_tokens + result.eval_count,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


def _responses_text(text: dict[str, Any] | None) -> dict[str, Any]:
    given = (text or {}).get("format")
    if not isinstance(given, dict):
        return {"format": {"type": "text"}}
    keys = ("type", "name", "schema", "strict")
    return {
        "format": {"type": given.get("type", ""), **{k: given[k] for k in keys[1:] if given.get(k)}}
    }


def _responses_reasoning(reasoning: dict[str, Any] | None, stream: bool) -> Any:
    effort = (reasoning or {}).get("effort") or ""
    summary = (reasoning or {}).get("summary") or ""
    if not effort and not summary:
        return None
    if stream:
        return {"effort": effort or None, "summary": summary or None}
    return {key: value for key, value in (("effort", effort), ("summary", summary)) if value}


def _responses_tools(tools: list[Any] | None) -> list[dict[str, Any]]:
    keys = ("type", "name", "description", "strict", "parameters")
    return [{key: tool.get(key) for key in keys} for tool in tools or [] if isinstance(tool, dict)]


def responses_object(
    job: Job, status: str, output: list[Any], usage: Any, stream: bool
) -> dict[str, Any]:
    """openai.ResponsesResponse (or the map its stream events carry), echoing the request."""
    echo = job.echo
    truncation = echo.get("truncation")
    temperature, top_p = echo.get("temperature"), echo.get("top_p")
    return {
        "id": job.request_id,
        "object": "response",
        "created_at": int(time.time()),
        "completed_at": None,
        "status": status,
        "incomplete_details": None,
        "model": job.model,
        "previous_response_id": None,
        "instructions": echo.get("instructions") or None,
        "output": output,
        "error": None,
        "tools": _responses_tools(echo.get("tools")),
        "tool_choice": "auto",
        "truncation": "disabled" if truncation is None else truncation,
        "parallel_tool_calls": True,
        "text": _responses_text(echo.get("text")),
        "top_p": go_number(1.0 if top_p is None else top_p),
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "top_logprobs": 0,
        "temperature": go_number(1.0 if temperature is None else temperature),
        "reasoning": _responses_reasoning(echo.get("reasoning"), stream),
        "usage": usage,
        "max_output_tokens": echo.get("max_output_tokens"),
        "max_tool_calls": None,
        "store": False,
        "background": bool(echo.get("background")),
        "service_tier": "default",
        "metadata": {},
        "safety_identifier": None,
        "prompt_cache_key": None,
    }


def responses_whole(job: Job, result: Result) -> dict[str, Any]:
    output = [message_item(f"msg_{random.randrange(999999)}", result.text, "completed")]
    body = responses_object(job, "completed", output, responses_usage(job, result), stream=False)
    return {**body, "completed_at": int(time.time())}


def stop_reason(done_reason: str) -> str:
    """anthropic.mapStopReason."""
    return {"stop": "end_turn", "length": "max_tokens"}.get(
        done_reason, done_reason and "stop_sequence"
    )


def anthropic_usage(job: Job, result: Result) -> dict[str, int]:
    return {"input_tokens": _input_tokens(job), "output_tokens": result.eval_count}


def anthropic_whole(job: Job, result: Result) -> dict[str, Any]:
    """anthropic.MessagesResponse (a nil content slice is null, stop_reason omitempty)."""
    content = [{"type": "text", "text": result.text}] if result.text else None
    body = {"id": job.request_id, "type": "message", "role": "assistant", "model": job.model}
    stop = {"stop_reason": reason} if (reason := stop_reason(result.done_reason)) else {}
    return {**body, "content": content, **stop, "usage": anthropic_usage(job, result)}


def whole_answer(job: Job, result: Result) -> tuple[str, bytes]:
    """The content type and body of a non-streamed answer."""
    if job.api.embeds:
        body = encode_json(embedding_answer(job, result))
        return (JSON_TYPE, body) if job.api.native else (PLAIN_JSON_TYPE, body + b"\n")
    if job.api is Api.OPENAI_RESPONSES:
        return PLAIN_JSON_TYPE, encode_json(responses_whole(job, result)) + b"\n"
    if job.api is Api.ANTHROPIC_MESSAGES:
        return PLAIN_JSON_TYPE, encode_json(anthropic_whole(job, result)) + b"\n"
    if job.api.openai:
        return PLAIN_JSON_TYPE, encode_json(openai_whole(job, result)) + b"\n"
    return JSON_TYPE, encode_json(native_final(job, result, result.text))
