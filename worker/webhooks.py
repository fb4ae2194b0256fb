"""Webhook delivery: every worker runs `webhook_loop`, which claims the deliveries that
are due (shared/lua/webhook_claim.lua: no two workers send the same attempt), POSTs each
to its key's `webhook_url` as it is at delivery time, signed with the key's secret
(shared/webhooks.py), and records the attempt (webhook_done.lua).

At least once: a 2xx delivers; anything else, or no answer within `TIMEOUT_S`, is tried
again after `BACKOFF_BASE_S` doubling, at most `BACKOFF_MAX_S` apart, until `RETRY_FOR_S`
after the event; then it fails and stays listed in `/admin/webhooks`. Every attempt sends
the same body under the same `webhook-id`. A worker that dies mid-attempt leaves its claim
to lapse after `CLAIM_MS`: the attempt is made again, by whichever worker claims it.

Deliveries hold no GPU slot and share nothing with the runs: their own loop, their own
HTTP client and pool, at most `CONCURRENCY` at once per worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import aiohttp

from shared import keys
from shared.errors import RedisUnavailable
from shared.outage import supervised
from shared.redis.store import REDIS_ERRORS, redis_errors, unavailable
from shared.scripts import ClaimedWebhook, WebhookOutcome
from shared.webhooks import DELIVERED_KEEP_S, FAILED_KEEP_S, State, secret_key, signed_headers
from worker.state import WorkerContext

log = logging.getLogger("gpugate.webhooks")

TIMEOUT_S = 10.0
"""An attempt that has no answer by then failed (the SPEC)."""
BACKOFF_BASE_S = 1
BACKOFF_MAX_S = 3600
RETRY_FOR_S = 86_400
"""How long after its event a delivery is still tried (the SPEC: 24 h)."""
CONCURRENCY = 8
"""Attempts under way at once, per worker."""
CLAIM_MS = int(TIMEOUT_S * 1000) * 3
"""A claim outlives any attempt made under it; a dead worker's lapses after this."""
POLL_S = 0.25
"""How often a worker looks for due deliveries (a due one waits at most this long)."""
LISTING_KEEP_MS = (RETRY_FOR_S + FAILED_KEEP_S + 3600) * 1000
"""A key's /admin/webhooks listing outlives its last delivery by the time it is shown."""
NO_WEBHOOK = "no webhook configured"
USER_AGENT = "gpugate-webhooks"


async def webhook_loop(ctx: WorkerContext) -> None:
    """Deliver for ever; the HTTP client is this loop's own, closed when it is cancelled."""
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=TIMEOUT_S),
        connector=aiohttp.TCPConnector(limit=CONCURRENCY),
        headers={"user-agent": USER_AGENT},
    ) as http:
        deliveries = Deliveries(ctx, http)
        try:
            await supervised("webhooks", deliveries.turn, ctx.redis_outage, log, retry_s=POLL_S)
        finally:
            await deliveries.stop()


class Deliveries:
    """One worker's attempts under way, and the loop that claims more while it has room."""

    def __init__(self, ctx: WorkerContext, http: aiohttp.ClientSession) -> None:
        self.ctx = ctx
        self.http = http
        self.sending: set[asyncio.Task[None]] = set()
        self.room = asyncio.Event()

    async def turn(self) -> float:
        """Claim what is due while there is room; then wait for room or POLL_S."""
        free = CONCURRENCY - len(self.sending)
        claimed: list[ClaimedWebhook] = []
        if free > 0:
            claimed = await self.ctx.scripts.claim_webhooks(
                worker=self.ctx.worker_id,
                limit=free,
                lease_ms=CLAIM_MS,
                listing_keep_ms=LISTING_KEEP_MS,
            )
            self.ctx.redis_outage.recovered()
            for delivery in claimed:
                task = asyncio.create_task(self.attempt(delivery), name=f"webhook {delivery.id}")
                self.sending.add(task)
                task.add_done_callback(self._done)
        if free > 0 and len(claimed) == free:
            return 0.0  # more may be due: look again at once, once there is room
        self.room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.room.wait(), POLL_S)
        return 0.0

    def _done(self, task: asyncio.Task[None]) -> None:
        self.sending.discard(task)
        self.room.set()

    async def stop(self) -> None:
        for task in self.sending:
            task.cancel()
        await asyncio.gather(*self.sending, return_exceptions=True)

    async def attempt(self, delivery: ClaimedWebhook) -> None:
        """One attempt, recorded. Whatever goes wrong is logged, never raised: the claim
        then lapses and the attempt is made again."""
        try:
            outcome, status, error = await self.send(delivery)
            reply = await self.ctx.scripts.webhook_done(
                id=delivery.id,
                claim=delivery.claim,
                outcome=outcome,
                status=status,
                error=error,
                base_ms=BACKOFF_BASE_S * 1000,
                max_ms=BACKOFF_MAX_S * 1000,
                retry_for_ms=RETRY_FOR_S * 1000,
                delivered_keep_ms=DELIVERED_KEEP_S * 1000,
                failed_keep_ms=FAILED_KEEP_S * 1000,
                listing_keep_ms=LISTING_KEEP_MS,
            )
        except (RedisUnavailable, *REDIS_ERRORS) as exc:
            self.ctx.redis_outage.failed(unavailable(exc), "waiting for it")
            return
        except Exception:
            log.exception("webhook %s: the attempt failed; its claim will lapse", delivery.id)
            return
        if reply.state is not None and outcome is not WebhookOutcome.DELIVERED:
            log.info(
                "webhook %s of key %s: attempt %d %s (%s)",
                delivery.id,
                delivery.key,
                reply.attempts,
                "will be retried" if reply.state is State.PENDING else "failed for good",
                error,
            )

    async def send(self, delivery: ClaimedWebhook) -> tuple[WebhookOutcome, int | str, str]:
        """POST the delivery to its key's webhook: the outcome, the HTTP status ('' when
        none came), the error ('' on success)."""
        target = await self.target(delivery.key)
        if target is None:
            return WebhookOutcome.FAILED, "", NO_WEBHOOK
        url, key = target
        body = delivery.body.encode()
        headers = signed_headers(key, delivery.id, int(time.time()), body)
        try:
            async with self.http.post(url, data=body, headers=headers, allow_redirects=False) as r:
                status = r.status
        except TimeoutError:
            return WebhookOutcome.RETRY, "", f"no answer within {TIMEOUT_S:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            return WebhookOutcome.RETRY, "", f"{type(exc).__name__}: {exc}"[:300]
        if 200 <= status < 300:
            return WebhookOutcome.DELIVERED, status, ""
        return WebhookOutcome.RETRY, status, f"HTTP {status}"

    async def target(self, name: str) -> tuple[str, bytes] | None:
        """The key's webhook URL and signing key now: its /admin/keys record's, else the
        keys file's (mirrored into Redis by the API); None when it has none (any more)."""
        with redis_errors():
            async with self.ctx.redis.pipeline(transaction=False) as pipe:
                for record in (keys.apikey(name), keys.WEBHOOK_FILE_KEY + name):
                    pipe.hmget(record, ["webhook_url", "webhook_secret"])
                replies: list[list[Any]] = await pipe.execute()
        for url, secret in replies:
            if url and secret:
                try:
                    return url.decode(), secret_key(secret.decode())
                except ValueError:
                    log.warning("key %s: its webhook secret is not a whsec_ secret", name)
                    return None
        return None
