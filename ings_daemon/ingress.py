"""The INGS guide's HTTP commands, produced to Kafka (INGS_HTTP_INGRESS=true).

    POST /handshake        a persona document       -> ings.handshake    202 {persona_id, minted, ...}
    POST /tune             the guide's tune body    -> ings.tune-request 202 {request_id, ...}
    POST /interact         an interaction (any form) -> ings.interaction 202 {event_id, memory_id, ...}
    POST /recall           a recall request         -> ings.recall-request 202 {request_id, ...}
    POST /feedback         a rating or correction   -> ings.feedback     202 {event_id, memory_id, ...}
    POST /v1/chat/completions  the OpenAI chat API with a persona as the model (serving/chat.py)
    GET  /personas/{did}   the registered persona, its memory count, latest adapter version and
                           the name that version is served under

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiokafka.errors import KafkaError
from pydantic import BaseModel

from .config import Settings, Topics
from .contract.events import Handshake, Interaction, RecallRequest, TuneRequest
from .contract.feedback import Feedback
from .contract.ids import DID_RE, digest, interaction_id, mint_did
from .contract.serving import served_name
from .runtime import logs, metrics
from .runtime.decode import Body, Incoming, Invalid, decode, json_object
from .runtime.http import Health, error_response
from .runtime.kafka import EventTooLarge, Producer, Publish
from .serving.chat import PersonaChat
from .serving.wire import openai_error
from .storage.adapters import AdapterStore, StoreError
from .storage.chroma import Collections, memory_of
from .storage.erasures import ErasureLedger
from .storage.personas import load_persona

# A POST waits this long for the broker's acknowledgement before answering 503.
PRODUCE_TIMEOUT_S = 15.0
# A body still arriving after this long is refused (408): slow senders cannot hold memory.
BODY_TIMEOUT_S = 30.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CHAT_PATH, MODELS_PATH = "/v1/chat/completions", "/v1/models"


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


def _feedback(item: Incoming[Feedback], topics: Topics) -> dict[str, Any]:
    pid = item.event.persona_id
    return {"persona_id": pid, "event_id": item.event_id, "memory_id": item.event.target, "see": topics.feedback_result}


COMMANDS: dict[str, Command] = {
    "/handshake": Command(Handshake, "handshake", _handshake),
    "/tune": Command(TuneRequest, "tune_request", _tune),
    "/interact": Command(Interaction, "interaction", _interact),
    "/recall": Command(RecallRequest, "recall_request", _recall),
    "/feedback": Command(Feedback, "feedback", _feedback),
}


def _with_request_id(raw: bytes) -> bytes:
    """A recall body without a `request_id` (or with null) gets one derived from the body,
    so a retried request is the same request, and its result is matched by it."""
    body = json_object(raw)
    if body is None or body.get("request_id") is not None:
        return raw
    return json.dumps({**body, "request_id": f"http-{digest('recall', raw, length=24)}"}).encode()


class Ingress:
    """The routes above, bound to one daemon's settings; `close` stops their producer."""

    def __init__(self, settings: Settings, health: Health | None = None) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.producer: Producer | None = None
        self.starting = asyncio.Lock()
        self.collections = Collections(settings)
        self.store: AdapterStore | None = None
        # A server the serving sync found down is tried last (when it runs in this process).
        self.health = health or Health()
        self.chat = PersonaChat(settings, self.collections, self._produce, self._server_down)

    def _server_down(self, url: str) -> bool:
        return self.health.checks.get(f"serving {url}") is not None

    def routes(self) -> list[web.RouteDef]:
        if not self.settings.ings_http_ingress:
            off = [web.post(path, self._off) for path in [*COMMANDS, CHAT_PATH]] + [web.get(MODELS_PATH, self._off)]
            return [*off, web.get("/personas/{did}", self._off)]
        posts = [web.post(path, self._counted(path, self._post), expect_handler=self._expect) for path in COMMANDS]
        chat = web.post(CHAT_PATH, self._counted(CHAT_PATH, self._chat), expect_handler=self._expect_chat)
        models = web.get(MODELS_PATH, self._counted(MODELS_PATH, self._models))
        return [*posts, chat, models, web.get("/personas/{did}", self._counted("/personas", self._persona))]

    async def close(self, _: web.Application | None = None) -> None:
        await self.chat.close()
        if self.producer is not None:
            await self.producer.stop()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raw = await self.read_body(request)
        return raw if isinstance(raw, web.Response) else await self.chat.handle(request, raw)

    async def _expect_chat(self, request: web.Request) -> web.StreamResponse | None:
        refusal = await self._expect(request)
        return None if refusal is None else openai_error(refusal)

    async def _models(self, _: web.Request) -> web.Response:
        """GET /v1/models: the registered personas as OpenAI models (id: the DID), which chat
        front ends list before they ask."""
        try:
            found = await self.collections.get("personas")
        except Exception as exc:
            return error_response(503, "chroma_unavailable", await self.collections.problem() or logs.describe(exc))
        data = [{"id": r.id, "object": "model", "created": 0, "owned_by": "ings-daemon"} for r in found]
        return web.json_response({"object": "list", "data": sorted(data, key=lambda m: str(m["id"]))})

    async def _off(self, _: web.Request) -> web.Response:
        return error_response(
            404, "ingress_off", "the HTTP commands are off here: set INGS_HTTP_INGRESS=true to use them"
        )

    def _counted(self, route: str, handler: Handler) -> Handler:
        async def counted(request: web.Request) -> web.StreamResponse:
            denied = self._denied(request)
            try:
                response = denied or await handler(request)
                if route in (CHAT_PATH, MODELS_PATH):  # OpenAI clients read errors in the OpenAI shape
                    response = openai_error(response)
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
        # RFC 7235: the scheme is case-insensitive; the header may hold any bytes.
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        expected = token.get_secret_value().encode()
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(errors="replace"), expected):
            return None
        reason = "send the header `Authorization: Bearer <INGS_HTTP_TOKEN>`"
        return error_response(401, "unauthorized", reason, **{"WWW-Authenticate": 'Bearer realm="ings-daemon"'})

    def _too_large(self, request: web.Request) -> web.Response | None:
        limit = self.settings.ings_max_event_bytes
        if request.content_length is not None and request.content_length > limit:
            return error_response(413, "too_large", f"the body is over INGS_MAX_EVENT_BYTES ({limit} bytes)")
        return None

    async def _expect(self, request: web.Request) -> web.Response | None:
        """`Expect: 100-continue`: refuse an oversized or unauthorised body before it is sent."""
        if request.headers.get("Expect", "").lower() != "100-continue":
            return error_response(417, "expectation_failed", "only `Expect: 100-continue` is understood")
        refusal = self._denied(request) or self._too_large(request)
        if refusal is None and request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return refusal

    async def read_body(self, request: web.Request) -> bytes | web.Response:
        """The whole body, or the answer to send instead: 413 past INGS_MAX_EVENT_BYTES,
        408 when it is still arriving after BODY_TIMEOUT_S, 400 when it cannot be read."""
        if refusal := self._too_large(request):
            return refusal
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error_response(
                413, "too_large", f"the body is over INGS_MAX_EVENT_BYTES ({self.settings.ings_max_event_bytes} bytes)"
            )
        except TimeoutError:
            return error_response(
                408, "body_timeout", f"the body did not arrive within {BODY_TIMEOUT_S:.0f} s", Connection="close"
            )
        except Exception as exc:  # a body its Content-Encoding does not decode, a broken chunk
            return error_response(400, "unreadable_body", f"the body could not be read: {logs.describe(exc)[:300]}")

    async def _post(self, request: web.Request) -> web.Response:
        command = COMMANDS[request.path]
        topic = str(getattr(self.topics, command.topic))
        raw = await self.read_body(request)
        if isinstance(raw, web.Response):
            return raw
        if request.path == "/recall":
            raw = _with_request_id(raw)
        try:
            item = decode(Body(topic, raw), command.model, self.settings.ings_max_event_bytes)
        except Invalid as exc:
            return error_response(413 if exc.kind == "too_large" else 400, exc.kind, str(exc))
        answer = command.answer(item, self.topics)
        # The validated event in the contract's own names, with the event id the consumer
        # will use: a wrapper, another spelling or stray spaces never reach the topic.
        event = item.event.model_copy(update={"event_id": item.event_id})
        try:
            async with asyncio.timeout(PRODUCE_TIMEOUT_S):
                await self._produce(
                    Publish(topic, answer["persona_id"], event.model_dump_json(exclude_unset=True).encode())
                )
        except EventTooLarge as exc:
            return error_response(413, "too_large", str(exc))
        except (KafkaError, OSError, TimeoutError) as exc:
            reason = (
                f"Kafka at {self.settings.kafka_bootstrap_servers} (KAFKA_BOOTSTRAP_SERVERS) did not acknowledge"
                f" the record within {PRODUCE_TIMEOUT_S:.0f} s: {logs.describe(exc)}. It may still be delivered:"
                " retry the same body (with an event_id, or the same request_id), and the repeat is recognised"
            )
            logs.event("ingress_produce_failed", logging.WARNING, topic=topic, error=logs.describe(exc))
            return error_response(503, "kafka_unavailable", reason, **{"Retry-After": "5"})
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
            return error_response(
                400, "invalid_did", f"{did[:200]!r} is not an INGS DID (did:nings:artificial:llm:...)"
            )
        try:
            persona = await load_persona(self.collections, did)
            count = int(await self.collections.call(memory_of(did), "count"))
        except Exception as exc:
            return error_response(503, "chroma_unavailable", await self.collections.problem() or logs.describe(exc))
        adapter = await asyncio.to_thread(self._latest_adapter, did)
        if persona is None and count == 0 and adapter is None:
            return error_response(404, "not_found", f"no handshake, memory or adapter for {did}")
        body = {
            "persona_id": did,
            "persona": persona.model_dump(mode="json") if persona else None,
            "memory_count": count,
            "adapter": adapter,
        }
        return web.json_response(body)

    def _latest_adapter(self, did: str) -> dict[str, Any] | None:
        """The newest adapter version under INGS_ADAPTER_DIR not retired by an erasure, and
        its base model; None when there is none here (an ingest deployment sees the
        trainer's only on a shared volume)."""
        root = self.settings.ings_adapter_dir
        try:
            # Opened once (it tidies stale temporary folders), when the folder is there.
            if self.store is None and root.is_dir():
                self.store = AdapterStore(root)
            store = self.store
            if store is None:
                return None
            retired = ErasureLedger(store).retired(did)
            live = [v for v in store.versions(did) if v not in retired]
        except OSError:  # a read-only or vanished volume: no adapter to report
            return None
        if not live:
            return None
        version = live[-1]
        try:
            base = store.manifest(did, version).get("base_model")
        except (OSError, ValueError, StoreError):
            base = None
        path = str(store.version_path(did, version))
        return {"version": version, "base_model": base, "path": path, "served_name": served_name(did, version)}
