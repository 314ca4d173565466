"""`ings-daemon tail`: follow topics and print their events as JSON lines, riding out a
broker that goes away (one line per retry, backing off) and stopping quietly on Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from .cli_input import resolve_topic
from .config import Settings

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer

# While the brokers do not answer, `tail` asks again after 1 s, doubling up to this.
TAIL_BACKOFF_MAX_S = 30.0
# An idle `tail` asks the brokers for metadata this often: aiokafka's own fetcher only
# logs its failures (40 lines a second), it never raises them.
TAIL_PROBE_EVERY_S = 2.0
TAIL_PROBE_TIMEOUT_S = 10.0


async def tail(
    settings: Settings,
    topics: Sequence[str],
    from_beginning: bool,
    count: int,
    timeout: float,
    on_event: Callable[[str, Any], Awaitable[None]] | None = None,
) -> int:
    """Print events as JSON lines until `count` were printed or `timeout` seconds passed
    (0: no limit); returns how many. `on_event(topic, event)` is awaited after each line.
    Tansu's end offsets are unreliable, so "from now" reads from the start and skips
    records older than the moment tail began.

    Raises UserError for an unknown topic and BrokerUnreachable when no broker answers at
    start; brokers that go away later are waited for (see `wait_for_broker`).
    """
    from aiokafka import AIOKafkaConsumer

    from .runtime.kafka import connect

    names = [resolve_topic(t, settings.topics) for t in topics]
    consumer = AIOKafkaConsumer(*names, **settings.kafka_common(), group_id=None, auto_offset_reset="earliest")
    started_ms = 0 if from_beginning else int(time.time() * 1000) - 1000
    printed = 0
    await connect(settings, consumer.start, consumer.stop)
    limit = asyncio.timeout(timeout or None)
    try:
        async with limit:
            next_probe = time.monotonic() + TAIL_PROBE_EVERY_S
            while not count or printed < count:
                batch = await consumer.getmany(timeout_ms=500)
                if not batch and time.monotonic() >= next_probe:
                    await wait_for_broker(consumer, settings.kafka_bootstrap_servers)
                    next_probe = time.monotonic() + TAIL_PROBE_EVERY_S
                for records in batch.values():
                    for r in records:
                        if r.timestamp >= started_ms:
                            # The key says whose a tombstone (event null) is.
                            key = r.key.decode(errors="replace") if r.key else None
                            shown = _shown(r.value)
                            print(json.dumps({"topic": r.topic, "key": key, "event": shown}), flush=True)
                            printed += 1
                            if on_event is not None:
                                await on_event(r.topic, shown)
    except TimeoutError:
        if not limit.expired():
            raise
    finally:
        await consumer.stop()
    return printed


async def wait_for_broker(consumer: AIOKafkaConsumer, address: str) -> None:
    """Return once the brokers answer a metadata request. While they do not, ask again
    after 1 s, doubling up to TAIL_BACKOFF_MAX_S, with one line on stderr per failed try;
    the consumer keeps its positions and goes on where it was."""
    from aiokafka.errors import KafkaError
    from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

    def report(state: RetryCallState) -> None:
        wait = state.next_action.sleep if state.next_action else 0
        _say(f"no answer from Kafka at {address} (KAFKA_BOOTSTRAP_SERVERS); trying again in {wait:.0f} s")

    tries = 0
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type((KafkaError, OSError, TimeoutError)),
        wait=wait_exponential(multiplier=1, max=TAIL_BACKOFF_MAX_S),
        before_sleep=report,
    ):
        tries = attempt.retry_state.attempt_number
        with attempt:
            await asyncio.wait_for(consumer.topics(), TAIL_PROBE_TIMEOUT_S)
    if tries > 1:
        _say(f"Kafka at {address} answers again; following on")


def _say(message: str) -> None:
    print(f"ings-daemon tail: {message}", file=sys.stderr, flush=True)


def _shown(value: bytes | None) -> Any:
    """A record's value as `tail` prints it: its JSON, or, for bytes that are not JSON (what
    a hostile producer may write), the text with undecodable bytes replaced."""
    if not value:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return {"not_json": value.decode("utf-8", errors="replace")[:2000]}
