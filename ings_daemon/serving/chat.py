"""Persona chat: `POST /v1/chat/completions`, the OpenAI chat API, where `model` is a persona.

    model      a persona DID, or one of its served names (ings-<type>-<doc>-<id>-v<N>)
    messages   the conversation; the last user turn is the recall query

For each request the daemon recalls the persona's INGS_CHAT_MEMORIES closest memories, puts
them and the persona's description into one system turn ahead of the caller's own system
text (the description is what the adapter was trained with), and forwards the request to
the first vLLM server of INGS_VLLM_URLS that answers, as the persona's current adapter (the
base model while it has none). The answer comes back as vLLM gave it, whole or streamed as
server-sent events, with `model` set to what the caller asked for. A finished exchange is
produced to `ings.interaction` (event id `chat-<completion id>`), so it becomes memory and
training data like any other; an answer cut short (the client left, or `length`) is kept too,
its `finish_reason` in the metadata, because the user saw it.

Answers: 400 for a body that is not a chat request (with the reasons), 404 for a model that
names no persona here, 503 naming every server when none answers; vLLM's own errors (a
prompt too long for the server) are passed on with their status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import ValidationError

from ..config import Settings
from ..contract.events import Interaction
from ..contract.ids import DID_RE, chat_event_id
from ..contract.serving import parse_served_name
from ..runtime import logs, metrics
from ..runtime.decode import Body, Invalid, decode
from ..runtime.http import error_response
from ..runtime.kafka import Publish
from ..storage.adapters import AdapterStore
from ..storage.chroma import Collections, memory_of
from ..storage.embedder import Embedder
from ..storage.erasures import ErasureLedger
from ..storage.feedback import answer_of, recall
from ..storage.personas import load_persona
from .sync import Servable, VllmBackend, current_version
from .vllm import Refused, ServerDown, VllmServer
from .wire import ChatRequest, system_turn

# A server that does not accept the connection within this many seconds is skipped for the
# next one; a slow answer is waited for up to INGS_CHAT_TIMEOUT_S.
CONNECT_TIMEOUT_S = 10.0
# Answers that end this way are recorded; one cut off (the client left, an error) is not
# training data.
RECORDED = frozenset({"stop", "length"})


@dataclass(frozen=True)
class Persona:
    """Who the request talks to: the DID, its description, the memories recalled for the
    request as (input, output) pairs, and its adapter (None: the base)."""

    persona_id: str
    description: str
    memories: list[tuple[str, str]]
    adapter: Servable | None


class PersonaChat:
    """The chat route. `produce` sends the recorded exchange; `is_down(url)` says whether the
    serving sync found a server down (it is then tried last)."""

    def __init__(
        self,
        settings: Settings,
        collections: Collections,
        produce: Callable[[Publish], Awaitable[None]],
        is_down: Callable[[str], bool] = lambda url: False,
    ) -> None:
        self.settings, self.collections, self.produce, self.is_down = settings, collections, produce, is_down
        self.servers = [VllmServer(url, settings.ings_vllm_api_key) for url in settings.ings_vllm_urls]
        self.embedder: Embedder | None = None  # the daemon's own when it runs the ingest role
        self.loading = asyncio.Lock()
        self.base_names: dict[str, str] = {}  # server url -> its base model's name
        self.store: AdapterStore | None = None

    async def close(self, _: web.Application | None = None) -> None:
        for server in self.servers:
            await server.close()

    async def handle(self, request: web.Request, raw: bytes) -> web.StreamResponse:
        """Answer one chat request whose body is `raw` (already read and size-checked)."""
        started = time.perf_counter()
        try:
            chat = decode(Body("chat", raw), ChatRequest, self.settings.ings_max_event_bytes).event
        except Invalid as exc:
            return error_response(400, exc.kind, str(exc))
        if not self.servers:
            return error_response(503, "no_server", "no vLLM server is configured here: set INGS_VLLM_URLS")
        try:
            persona = await self._persona(chat)
        except LookupError as exc:
            return error_response(404, "model_not_found", str(exc))
        except Exception as exc:  # Chroma away, the embedding model, the adapter store
            reason = await self.collections.problem() or logs.describe(exc)
            return error_response(503, "recall_failed", f"the persona's memories could not be read: {reason}")
        metrics.CHAT_SECONDS.labels(stage="recall").observe(time.perf_counter() - started)
        caller = [m.text() for m in chat.messages if m.role in ("system", "developer")]
        turns = [{"role": "system", "content": system_turn(persona.description, persona.memories, caller)}]
        turns += [{"role": m.role, "content": m.text()} for m in chat.messages if m.role in ("user", "assistant")]
        body = {**chat.model_dump(exclude_none=True, exclude={"messages"}), "messages": turns}
        problems = []
        for server in sorted(self.servers, key=lambda server: self.is_down(server.url)):
            try:
                return await self._forward(request, server, body, chat, persona, started)
            except ServerDown as exc:
                problems.append(str(exc))
            except Refused as exc:  # an answer this daemon cannot pass on
                return error_response(502, "bad_gateway", f"{server.url}: {exc}")
        reason = f"no vLLM server answered (INGS_VLLM_URLS): {'; '.join(problems)}"
        logs.event("chat_no_server", logging.WARNING, reason=reason)
        return error_response(503, "server_unavailable", reason, **{"Retry-After": "5"})

    async def _persona(self, chat: ChatRequest) -> Persona:
        """The persona `chat.model` names, its description, the memories recalled for the last
        user turn and its current adapter. Raises LookupError for a model that names no persona here."""
        persona_id, asked_version = chat.model, None
        if not DID_RE.fullmatch(chat.model):
            parsed = parse_served_name(chat.model)
            if parsed is None:
                raise LookupError(f"{chat.model[:200]!r} is neither a persona DID nor a served name of one")
            persona_id, asked_version = parsed
        adapter = await asyncio.to_thread(self._adapter, persona_id)
        if asked_version is not None and (adapter is None or adapter.version != asked_version):
            raise LookupError(f"{chat.model} is not the persona's current version: ask for {persona_id}")
        persona = await load_persona(self.collections, persona_id)
        memories: list[tuple[str, str]] = []
        query = next((m.text() for m in reversed(chat.messages) if m.role == "user"), "")
        if self.settings.ings_chat_memories and query.strip():
            vector = (await (await self._embedder()).embed([query]))[0]
            found = await recall(
                self.collections,
                memory_of(persona_id),
                vector,
                self.settings.ings_chat_memories,
                self.settings.ings_recall_feedback_boost,
            )
            # A corrected answer is recalled as the user corrected it.
            memories = [(str(r.metadata.get("input", "")), answer_of(r.metadata)) for r in found]
        if persona is None and adapter is None and not memories:
            raise LookupError(f"no handshake, memory or adapter for {persona_id}")
        description = persona.description if persona else ""
        return Persona(persona_id, description, memories, adapter)

    def _adapter(self, persona_id: str) -> Servable | None:
        root = self.settings.ings_adapter_dir
        if not root.is_dir():
            return None
        if self.store is None:  # opened once: opening tidies stale temporary folders
            self.store = AdapterStore(root)
        ledger = ErasureLedger(self.store)
        return current_version(self.store, ledger, persona_id, self.settings.ings_base_model, verify=False)

    async def _embedder(self) -> Embedder:
        async with self.loading:
            if self.embedder is None:
                s = self.settings
                self.embedder = await asyncio.to_thread(
                    Embedder, s.ings_embedding_model_path, s.ings_embedding_batch_size, s.ings_embedding_precision
                )
            return self.embedder

    async def _base_name(self, server: VllmServer) -> str:
        if server.url not in self.base_names:
            bases = [m["id"] for m in await server.models() if not m.get("parent")]
            if not bases:
                raise ServerDown(f"{server.url}: /v1/models lists no base model")
            self.base_names[server.url] = bases[0]
        return self.base_names[server.url]

    async def _forward(
        self,
        request: web.Request,
        server: VllmServer,
        body: dict[str, Any],
        chat: ChatRequest,
        persona: Persona,
        started: float,
    ) -> web.StreamResponse:
        """Send the request to `server` and answer with what it gives. Raises ServerDown when
        it does not answer, Refused when its answer is not an OpenAI chat answer."""
        model = persona.adapter.name if persona.adapter else await self._base_name(server)
        upstream = await self._post(server, {**body, "model": model})
        if upstream.status == 404 and persona.adapter is not None:
            # The adapter is not there (a restarted server the sync has not reconciled yet):
            # load it now rather than answer "no such model" for a persona that has one.
            upstream.release()
            root = self.settings.ings_serving_adapter_root
            await VllmBackend(server, self.settings.ings_adapter_dir, root).load(model, persona.adapter.path)
            logs.event("chat_loaded_adapter", target=server.url, served_name=model)
            upstream = await self._post(server, {**body, "model": model})
        async with upstream:
            if upstream.status in (502, 503, 504):
                raise ServerDown(f"{server.url}: HTTP {upstream.status}")
            if upstream.status != 200:
                text = await upstream.text()
                return web.Response(text=text, status=upstream.status, content_type="application/json")
            if not chat.stream:
                try:
                    answer = ChatCompletion.model_validate_json(await upstream.read())
                except (ValidationError, aiohttp.ClientError) as exc:
                    raise Refused(f"not an OpenAI chat completion: {logs.describe(exc)[:300]}") from exc
                answer = answer.model_copy(update={"model": chat.model})
                metrics.CHAT_SECONDS.labels(stage="total").observe(time.perf_counter() - started)
                choice = answer.choices[0] if answer.choices else None
                if choice is not None:
                    said = choice.message.content or ""
                    await self._record(chat, persona, model, answer.id, said, choice.finish_reason)
                return web.json_response(text=answer.model_dump_json(exclude_unset=True))
            return await self._stream(request, upstream, chat, persona, model, started)

    async def _post(self, server: VllmServer, body: dict[str, Any]) -> aiohttp.ClientResponse:
        timeout = aiohttp.ClientTimeout(total=self.settings.ings_chat_timeout_s, sock_connect=CONNECT_TIMEOUT_S)
        try:
            return await server.session().post(f"{server.url}/v1/chat/completions", json=body, timeout=timeout)
        except TimeoutError as exc:
            raise ServerDown(
                f"{server.url}: no answer within INGS_CHAT_TIMEOUT_S or {CONNECT_TIMEOUT_S:.0f} s to connect"
            ) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ServerDown(f"{server.url}: {type(exc).__name__}: {str(exc)[:300]}") from exc

    async def _stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        chat: ChatRequest,
        persona: Persona,
        model: str,
        started: float,
    ) -> web.StreamResponse:
        """Relay the server's events; an error in the middle (the engine died, an event that
        is no chunk) is passed on as an OpenAI error event, then `[DONE]`."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        text: list[str] = []
        completion_id = ""
        finish_reason: str | None = None
        try:
            async for chunk in _events(upstream):
                if not isinstance(chunk, ChatCompletionChunk):
                    error = chunk or {"message": "the server ended the stream early", "type": "server_error"}
                    await response.write(f"data: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n".encode())
                    finish_reason = "error"
                    break
                if not text and not completion_id:
                    metrics.CHAT_SECONDS.labels(stage="first_token").observe(time.perf_counter() - started)
                completion_id = chunk.id
                for choice in chunk.choices:
                    text.append(choice.delta.content or "")
                    finish_reason = choice.finish_reason or finish_reason
                out = chunk.model_copy(update={"model": chat.model}).model_dump_json(exclude_unset=True)
                await response.write(f"data: {out}\n\n".encode())
            else:
                await response.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, aiohttp.ClientError, ValidationError, ValueError) as exc:
            finish_reason = "disconnected" if isinstance(exc, ConnectionResetError) else "error"
            logs.event("chat_stream_ended", logging.WARNING, finish_reason=finish_reason, error=logs.describe(exc))
            with contextlib.suppress(ConnectionResetError, aiohttp.ClientError):
                error = {"message": f"the stream broke: {logs.describe(exc)[:300]}", "type": "server_error"}
                await response.write(f"data: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n".encode())
        metrics.CHAT_SECONDS.labels(stage="total").observe(time.perf_counter() - started)
        if completion_id:
            await self._record(chat, persona, model, completion_id, "".join(text), finish_reason)
        return response

    async def _record(
        self, chat: ChatRequest, persona: Persona, model: str, completion_id: str, answer: str, finish: str | None
    ) -> None:
        """Produce a finished exchange (`finish` in RECORDED) to `ings.interaction`; a
        failure is logged, never answered: the caller has the answer already."""
        if finish not in RECORDED:
            logs.event("chat_not_recorded", persona_id=persona.persona_id, finish_reason=finish)
            return
        asked = next((m.text() for m in reversed(chat.messages) if m.role == "user"), "")
        metadata: dict[str, Any] = {"source": "chat", "served_model": model, "finish_reason": finish}
        try:
            event = Interaction.model_validate(
                {
                    "persona_id": persona.persona_id,
                    "input": asked,
                    "output": answer,
                    "event_id": chat_event_id(completion_id),
                    "session_id": chat.user,
                    "metadata": metadata,
                }
            )
            topic = self.settings.topics.interaction
            await self.produce(Publish(topic, persona.persona_id, event.model_dump_json(exclude_none=True).encode()))
        except Exception as exc:  # an empty or oversized answer, the broker away
            logs.event("chat_not_recorded", logging.WARNING, persona_id=persona.persona_id, error=logs.describe(exc))


async def _events(upstream: aiohttp.ClientResponse) -> AsyncIterator[ChatCompletionChunk | dict[str, Any] | None]:
    """The chunks of an OpenAI server-sent event stream until its `[DONE]`; an error event
    (`{"error": {...}}`) as its error object; None when the stream ends without `[DONE]`.
    Raises ValueError or ValidationError for an event that is neither."""
    async for line in upstream.content:
        data = line.decode("utf-8", "replace").strip()
        if not data.startswith("data:"):
            continue
        data = data[len("data:") :].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if isinstance(event, dict) and isinstance(event.get("error"), dict):
            yield event["error"]
            return
        yield ChatCompletionChunk.model_validate(event)
    yield None
