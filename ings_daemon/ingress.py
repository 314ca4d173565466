"""The INGS guide's HTTP commands, produced to Kafka (INGS_HTTP_INGRESS=true).

    POST /handshake        a persona document       -> ings.handshake    202 {persona_id, minted, ...}
    POST /tune             the guide's tune body    -> ings.tune-request 202 {request_id, ...}
    POST /interact         an interaction (any form) -> ings.interaction 202 {event_id, memory_id, ...}
    POST /recall           a recall request         -> ings.recall-request 202 {request_id, ...}
    GET  /personas/{did}   the registered persona, its memory count and latest adapter version

A POST is decoded and validated exactly as the consumer will (`runtime.decode`: 400 with
the reasons, 413 past INGS_MAX_EVENT_BYTES), then produced to Kafka and answered 202 once
the broker has acknowledged it: the daemon processes it like any other record, so
per-persona order and at-least-once delivery hold, and the outcome follows on the output
topic named in the answer. With INGS_HTTP_TOKEN set every route here needs
`Authorization: Bearer <token>` (401 otherwise). The routes run on the HTTP server's own
loop (`runtime.http`) with their own producer, started at the first POST.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiokafka.errors import KafkaError
from pydantic import BaseModel

from .config import Settings, Topics
from .contract.events import Handshake, Interaction, RecallRequest, TuneRequest
from .contract.ids import DID_RE, interaction_id, mint_did
from .runtime import logs, metrics
from .runtime.decode import Incoming, Invalid, decode, json_object
from .runtime.kafka import EventTooLarge, Producer, Publish
from .storage.chroma import Collections, memory_of
from .storage.personas import load_persona

# A POST waits this long for the broker's acknowledgement before answering 503.
PRODUCE_TIMEOUT_S = 15.0
Handler = Callable[[web.Request], Awaitable[web.Response]]


@dataclass
class Body:
    """An HTTP body in the shape `decode` reads (a record with no Kafka coordinates)."""

    topic: str
    value: bytes | None
    partition: int = -1
    offset: int = -1
    key: bytes | None = None


@dataclass(frozen=True)
class Command:
    """One POST route: the event it takes, the topic (a `Topics` field) it goes to, and
    its 202 answer, which always names the `persona_id` the record is keyed by."""

    model: type[BaseModel]
    topic: str
    answer: Callable[[Incoming[Any], Topics], dict[str, Any]]


def _handshake(item: Incoming[Handshake], topics: Topics) -> dict[str, Any]:
    info = item.event.persona
    # The DID the consumer will register: minted from the same idempotency key.
    did = info.persona_id or mint_did(info.name, item.event.version, item.event_id)
    return {"persona_id": did, "minted": info.persona_id is None, "event_id": item.event_id, "see": topics.persona}


def _tune(item: Incoming[TuneRequest], topics: Topics) -> dict[str, Any]:
    request_id = item.event.request_id or item.event_id
    return {"persona_id": item.event.persona_id, "request_id": request_id, "see": topics.tune_status}


def _interact(item: Incoming[Interaction], topics: Topics) -> dict[str, Any]:
    pid = item.event.persona_id
    return {"persona_id": pid, "event_id": item.event_id, "memory_id": interaction_id(pid, item.event_id)}


def _recall(item: Incoming[RecallRequest], topics: Topics) -> dict[str, Any]:
    return {"persona_id": item.event.persona_id, "request_id": item.event.request_id, "see": topics.recall_result}


COMMANDS: dict[str, Command] = {
    "/handshake": Command(Handshake, "handshake", _handshake),
    "/tune": Command(TuneRequest, "tune_request", _tune),
    "/interact": Command(Interaction, "interaction", _interact),
    "/recall": Command(RecallRequest, "recall_request", _recall),
}


def _error(status: int, error: str, reason: str, **headers: str) -> web.Response:
    return web.json_response({"error": error, "reason": reason}, status=status, headers=headers or None)


def _with_request_id(raw: bytes) -> bytes:
    """A recall body without a `request_id` gets one (the result is matched by it)."""
    body = json_object(raw)
    if body is None or "request_id" in body:
        return raw
    return json.dumps({**body, "request_id": f"http-{uuid.uuid4().hex}"}).encode()


class Ingress:
    """The routes above, bound to one daemon's settings; `close` stops their producer."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.producer: Producer | None = None
        self.starting = asyncio.Lock()
        self.collections = Collections(settings)

    def routes(self) -> list[web.RouteDef]:
        if not self.settings.ings_http_ingress:
            return [web.post(path, self._off) for path in COMMANDS] + [web.get("/personas/{did}", self._off)]
        posts = [web.post(path, self._counted(path, self._post)) for path in COMMANDS]
        return [*posts, web.get("/personas/{did}", self._counted("/personas", self._persona))]

    async def close(self, _: web.Application | None = None) -> None:
        if self.producer is not None:
            await self.producer.stop()

    async def _off(self, _: web.Request) -> web.Response:
        return _error(404, "ingress_off", "the HTTP commands are off here: set INGS_HTTP_INGRESS=true to use them")

    def _counted(self, route: str, handler: Handler) -> Handler:
        async def counted(request: web.Request) -> web.Response:
            denied = self._denied(request)
            try:
                response = denied or await handler(request)
            except web.HTTPException as exc:  # aiohttp's own answers, such as 413
                metrics.HTTP_REQUESTS.labels(route=route, code=str(exc.status)).inc()
                raise
            metrics.HTTP_REQUESTS.labels(route=route, code=str(response.status)).inc()
            return response

        return counted

    def _denied(self, request: web.Request) -> web.Response | None:
        token = self.settings.ings_http_token
        if token is None:
            return None
        expected = f"Bearer {token.get_secret_value()}".encode()
        if hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected):
            return None
        reason = "send the header `Authorization: Bearer <INGS_HTTP_TOKEN>`"
        return _error(401, "unauthorized", reason, **{"WWW-Authenticate": 'Bearer realm="ings-daemon"'})

    async def _post(self, request: web.Request) -> web.Response:
        command = COMMANDS[request.path]
        topic = str(getattr(self.topics, command.topic))
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            limit = self.settings.ings_max_event_bytes
            return _error(413, "too_large", f"the body is over INGS_MAX_EVENT_BYTES ({limit} bytes)")
        if request.path == "/recall":
            raw = _with_request_id(raw)
        try:
            item = decode(Body(topic, raw), command.model, self.settings.ings_max_event_bytes)
        except Invalid as exc:
            return _error(413 if exc.kind == "too_large" else 400, exc.kind, str(exc))
        answer = command.answer(item, self.topics)
        try:
            async with asyncio.timeout(PRODUCE_TIMEOUT_S):
                await self._produce(Publish(topic, answer["persona_id"], raw))
        except EventTooLarge as exc:
            return _error(413, "too_large", str(exc))
        except (KafkaError, OSError, TimeoutError) as exc:
            reason = (
                f"Kafka at {self.settings.kafka_bootstrap_servers} (KAFKA_BOOTSTRAP_SERVERS) did not acknowledge"
                f" the record within {PRODUCE_TIMEOUT_S:.0f} s: {logs.describe(exc)}; nothing was accepted, retry"
            )
            logs.event("ingress_produce_failed", logging.WARNING, topic=topic, error=logs.describe(exc))
            return _error(503, "kafka_unavailable", reason, **{"Retry-After": "5"})
        return web.json_response({"accepted": True, "topic": topic, **answer}, status=202)

    async def _produce(self, item: Publish) -> None:
        async with self.starting:
            if self.producer is None:
                producer = Producer(self.settings)
                try:
                    await producer.start()
                except BaseException:
                    await producer.stop()
                    raise
                self.producer = producer
        await self.producer.publish([item])

    async def _persona(self, request: web.Request) -> web.Response:
        did = request.match_info["did"]
        if not DID_RE.fullmatch(did):
            return _error(400, "invalid_did", f"{did[:200]!r} is not an INGS DID (did:nings:artificial:llm:...)")
        try:
            persona = await load_persona(self.collections, did)
            count = int(await self.collections.call(memory_of(did), "count"))
        except Exception as exc:
            return _error(503, "chroma_unavailable", await self.collections.problem() or logs.describe(exc))
        adapter = await asyncio.to_thread(self._latest_adapter, did)
        if persona is None and count == 0 and adapter is None:
            return _error(404, "not_found", f"no handshake, memory or adapter for {did}")
        body = {
            "persona_id": did,
            "persona": persona.model_dump(mode="json") if persona else None,
            "memory_count": count,
            "adapter": adapter,
        }
        return web.json_response(body)

    def _latest_adapter(self, did: str) -> dict[str, Any] | None:
        """The newest adapter version under INGS_ADAPTER_DIR and its base model; None when
        there is none here (an ingest deployment sees the trainer's only on a shared volume)."""
        from .storage.adapters import AdapterStore, StoreError

        root = self.settings.ings_adapter_dir
        try:
            store = AdapterStore(root) if root.is_dir() else None
            version = store.latest(did) if store else None
        except OSError:  # a read-only or vanished volume: no adapter to report
            return None
        if store is None or version is None:
            return None
        try:
            base = store.manifest(did, version).get("base_model")
        except (OSError, ValueError, StoreError):
            base = None
        return {"version": version, "base_model": base, "path": str(store.version_path(did, version))}
