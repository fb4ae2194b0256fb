"""Inference: one request on one of the nine APIs, from its body to its answer's last byte."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.types import Message, Receive, Scope, Send

from gpugate.sim.answers import Result, whole_answer
from gpugate.sim.apis import Api, ApiError
from gpugate.sim.asgi import Holds, StreamWriter, read_body, send_whole, until_disconnect
from gpugate.sim.config import FAILURES
from gpugate.sim.content import reply_tokens
from gpugate.sim.golang import encode_json
from gpugate.sim.performance import Generation
from gpugate.sim.requests import Job, parse_request
from gpugate.sim.simulator import Simulator
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


class InferenceEndpoint:
    """A raw ASGI endpoint, so that it can watch for the client's disconnect itself: it
    loads the model (or joins its load), takes a slot, generates and answers."""

    def __init__(self, sim: Simulator, api: Api) -> None:
        self.sim = sim
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count the request from its whole body to its last byte, and serve it."""
        body = await read_body(receive)
        if body is None:
            return
        self.sim.stats.enter()
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
                self.sim.stats.leave("completed" if status < 400 else "failed")
            await send(message)

        try:
            outcome = await self._serve(body, receive, send_counted)
        except asyncio.CancelledError:  # the server is shutting down
            outcome = "cancelled"
            raise
        finally:
            if not left:
                self.sim.stats.leave(outcome)

    async def _serve(self, body: bytes, receive: Receive, send: Send) -> str:
        try:
            job = parse_request(self.api, body, self.sim.models)
            if self.sim.config.fail_mode in FAILURES:
                raise ApiError(*FAILURES[self.sim.config.fail_mode])
        except ApiError as error:
            answer = encode_json(error.body(self.api))
            await send_whole(send, error.status, error.content_type(self.api), answer)
            return "failed"
        if self.sim.config.fail_mode == "hang":
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
                self.sim.residency.unload(target)
                await self._send_action(job, send, clock)
                return
            await self.sim.residency.acquire(target, job.keep_alive_s)
            holds.add(lambda: self.sim.residency.release(target))
            clock.loaded = time.monotonic_ns()
            if job.action:  # "load": an empty prompt only loads the model, without a slot
                await self._send_action(job, send, clock)
                return
            await self.sim.slots.acquire()
            holds.add(self.sim.slots.release)
            clock.started = time.monotonic_ns()
            try:
                generation = self.sim.performance.start(target.name, job.material)
            except ApiError as error:  # out of memory
                answer = encode_json(error.body(self.api))
                await send_whole(send, error.status, error.content_type(self.api), answer)
                return
            holds.add(generation.finish)
            await self._run(job, send, clock, generation)
        finally:
            holds.release()

    async def _run(self, job: Job, send: Send, clock: Clock, generation: Generation) -> None:
        if job.api.embeds:
            await self._embed(job, send, clock)
        elif job.stream:
            await self._stream(job, send, clock, generation)
        else:
            await self._whole(job, send, clock, generation)

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
        count, reason = self.sim.config.tokens, "stop"
        if job.num_predict is not None and job.num_predict <= count:
            count, reason = job.num_predict, "length"
        return reply_tokens(job.model, job.material, count), reason

    async def _generate(
        self, tokens: list[str], clock: Clock, generation: Generation
    ) -> AsyncIterator[str]:
        """The prompt (its uncached part), then each token, as long as the model says."""
        prompt_s = generation.prompt_s()
        if prompt_s > 0:
            await asyncio.sleep(prompt_s)
        generation.prompt_done()
        clock.first = time.monotonic_ns()
        for token in tokens:
            await asyncio.sleep(generation.token_s())  # sleep(0) only yields to the loop
            generation.generated(token)
            yield token

    async def _stream(self, job: Job, send: Send, clock: Clock, generation: Generation) -> None:
        fmt = stream_format(job)
        writer = StreamWriter(send, fmt.content_type)
        planned, reason = self._plan(job)
        tokens = []
        async for token in self._generate(planned, clock, generation):
            tokens.append(token)
            await writer.write(fmt.piece(token))
        await writer.write_all(fmt.end(clock.result(tokens, reason)))

    async def _whole(self, job: Job, send: Send, clock: Clock, generation: Generation) -> None:
        planned, reason = self._plan(job)
        tokens = [token async for token in self._generate(planned, clock, generation)]
        await self._send_whole(job, send, clock.result(tokens, reason))

    async def _embed(self, job: Job, send: Send, clock: Clock) -> None:
        clock.first = time.monotonic_ns()
        for _ in job.inputs:
            await asyncio.sleep(self.sim.config.token_delay_s)
        await self._send_whole(job, send, clock.result([], ""))

    async def _send_whole(self, job: Job, send: Send, result: Result) -> None:
        content_type, body = whole_answer(job, result)
        await send_whole(send, 200, content_type, body)
