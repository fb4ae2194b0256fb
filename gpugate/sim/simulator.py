"""The state behind the app, and the inference requests it serves."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from gpugate.sim.answers import Result, whole_answer
from gpugate.sim.apis import Api, ApiError
from gpugate.sim.asgi import Holds, StreamWriter, read_body, send_whole, until_disconnect
from gpugate.sim.config import SimConfig, updated_config, validate_config
from gpugate.sim.content import reply_tokens
from gpugate.sim.golang import encode_json
from gpugate.sim.models import SimModel
from gpugate.sim.names import model_key
from gpugate.sim.requests import Job, parse_request
from gpugate.sim.residency import Residency
from gpugate.sim.slots import SlotGate
from gpugate.sim.stats import Stats
from gpugate.sim.streams import stream_format


@dataclass
class Clock:
    """Monotonic checkpoints of one request, in nanoseconds."""

    start: int = field(default_factory=time.monotonic_ns)
    loaded: int = 0  # the model is loaded
    started: int = 0  # it holds a slot
    first: int = 0  # the first token

    def result(self, tokens: list[str], done_reason: str) -> Result:
        end = time.monotonic_ns()
        loaded = self.loaded or self.start
        started = self.started or loaded
        first = self.first or started
        return Result(
            text="".join(tokens),
            eval_count=len(tokens),
            done_reason=done_reason,
            total_ns=end - self.start,
            load_ns=loaded - self.start,
            prompt_eval_ns=first - started,
            eval_ns=end - first,
        )


class Simulator:
    """The state behind the app: config, counters, slots, models, loaded models, blobs."""

    def __init__(self, config: SimConfig) -> None:
        validate_config(config)
        self.config = config
        self.stats = Stats()
        self.slots = SlotGate(lambda: self.config.parallel, self.stats)
        started = datetime.now(UTC)
        described = (SimModel.describe(name, started) for name in config.models)
        self.models = {model_key(model.name): model for model in described}
        self.residency = Residency(lambda: self.config, self.stats)
        self.blobs: dict[str, int] = {}

    # inference

    async def handle(self, api: Api, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        if body is None:
            return
        self.stats.enter()
        outcome = "failed"
        status = 200
        left = False

        async def send_counted(message: Message) -> None:
            # Generation is over before the last byte is written (as on a GPU): the
            # request stops counting then, so a client that has the whole answer can
            # never see it still counted.
            nonlocal status, left
            if message["type"] == "http.response.start":
                status = message["status"]
            elif not left and not message.get("more_body", False):
                left = True
                self.stats.leave("completed" if status < 400 else "failed")
            await send(message)

        try:
            outcome = await self._serve(api, body, receive, send_counted)
        except asyncio.CancelledError:  # the server is shutting down
            outcome = "cancelled"
            raise
        finally:
            if not left:
                self.stats.leave(outcome)

    async def _serve(self, api: Api, body: bytes, receive: Receive, send: Send) -> str:
        try:
            job = parse_request(api, body, self.models)
            if self.config.fail_mode == "error500":
                raise ApiError(500, "simulated failure")
        except ApiError as error:
            await send_whole(
                send, error.status, error.content_type(api), encode_json(error.body(api))
            )
            return "failed"
        if self.config.fail_mode == "hang":
            return await until_disconnect(asyncio.Event().wait(), receive)
        return await until_disconnect(self._answer(job, send), receive)

    async def _answer(self, job: Job, send: Send) -> None:
        """Load the model (or join its load), take a slot, answer; give both back."""
        assert job.target is not None
        target = job.target
        clock = Clock()
        holds = Holds()
        send = holds.releasing(send)
        try:
            if job.action == "unload":
                self.residency.unload(target)
                await self._send_action(job, send, clock)
                return
            await self.residency.acquire(target, job.keep_alive_s)
            holds.add(lambda: self.residency.release(target))
            clock.loaded = time.monotonic_ns()
            if job.action:  # "load": an empty prompt only loads the model, without a slot
                await self._send_action(job, send, clock)
                return
            await self.slots.acquire()
            holds.add(self.slots.release)
            clock.started = time.monotonic_ns()
            await self._run(job, send, clock)
        finally:
            holds.release()

    async def _run(self, job: Job, send: Send, clock: Clock) -> None:
        if job.api.embeds:
            await self._embed(job, send, clock)
        elif job.stream:
            await self._stream(job, send, clock)
        else:
            await self._whole(job, send, clock)

    async def _send_action(self, job: Job, send: Send, clock: Clock) -> None:
        """The answer to an empty prompt: one object (or stream end), no tokens."""
        result = clock.result([], job.action or "load")
        if job.stream and not job.api.native:
            fmt = stream_format(job)
            await StreamWriter(send, fmt.content_type).write_all(fmt.end(result))
        else:
            await self._send_whole(job, send, result)

    def _plan(self, job: Job) -> tuple[list[str], str]:
        """The reply's tokens and done_reason: "length" when num_predict cut it short."""
        count, reason = self.config.tokens, "stop"
        if job.num_predict is not None and job.num_predict <= count:
            count, reason = job.num_predict, "length"
        return reply_tokens(job.model, job.material, count), reason

    async def _generate(self, tokens: list[str], clock: Clock) -> AsyncIterator[str]:
        delay = self.config.token_delay_s
        clock.first = time.monotonic_ns()
        for token in tokens:
            await asyncio.sleep(delay)  # sleep(0) only yields to the loop
            yield token

    async def _stream(self, job: Job, send: Send, clock: Clock) -> None:
        fmt = stream_format(job)
        writer = StreamWriter(send, fmt.content_type)
        planned, reason = self._plan(job)
        tokens = []
        async for token in self._generate(planned, clock):
            tokens.append(token)
            await writer.write(fmt.piece(token))
        await writer.write_all(fmt.end(clock.result(tokens, reason)))

    async def _whole(self, job: Job, send: Send, clock: Clock) -> None:
        planned, reason = self._plan(job)
        tokens = [token async for token in self._generate(planned, clock)]
        await self._send_whole(job, send, clock.result(tokens, reason))

    async def _embed(self, job: Job, send: Send, clock: Clock) -> None:
        clock.first = time.monotonic_ns()
        for _ in job.inputs:
            await asyncio.sleep(self.config.token_delay_s)
        await self._send_whole(job, send, clock.result([], ""))

    async def _send_whole(self, job: Job, send: Send, result: Result) -> None:
        content_type, body = whole_answer(job, result)
        await send_whole(send, 200, content_type, body)

    # metadata

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

    def reconfigure(self, changes: Mapping[str, Any]) -> None:
        self.config = updated_config(self.config, changes)
        self.slots.wake()
        self.residency.trim()


class InferenceEndpoint:
    """A raw ASGI endpoint, so that it can watch for the client's disconnect itself."""

    def __init__(self, sim: Simulator, api: Api) -> None:
        self.sim = sim
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.sim.handle(self.api, receive, send)
