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
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import aiohttp
from aiohttp import web
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StringConstraints

from ..config import Settings
from ..contract.events import Interaction
from ..contract.ids import DID_RE
from ..contract.serving import parse_served_name
from ..runtime import logs, metrics
from ..runtime.decode import Body, Invalid, decode
from ..runtime.http import error_response
from ..runtime.kafka import Publish
from ..storage.adapters import AdapterStore
from ..storage.chroma import Collections, memory_of
from ..storage.embedder import Embedder
from ..storage.erasures import ErasureLedger
from ..storage.personas import load_persona
from .sync import Servable, current_version
from .vllm import ServerDown, VllmServer

# Each memory is cut to this many characters in the system turn: a few memories must fit a
# small server's context (vLLM's --max-model-len) beside the conversation.
MEMORY_CHARS = 400
# Special-token spellings (<|im_end|>, <|eot_id|>, <s>, </s>): a memory or description that
# holds one could end the system turn early and forge another in the rendered prompt.
_SPECIAL = re.compile(r"<\|[^|<>\s]{1,40}\|>|</?s>")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Annotated[str, StringConstraints(max_length=200_000)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, StringConstraints(max_length=200_000)] | list[TextPart]
    name: Annotated[str, StringConstraints(max_length=64)] | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(BaseModel):
    """The OpenAI chat request fields this endpoint passes on (text only: no tools, images
    or audio, and one choice). The `openai` package's request types are TypedDicts for
    callers, without the bounds a server needs, so the accepted subset is declared here."""

    model_config = ConfigDict(extra="forbid")
    model: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    stream: StrictBool = False
    stream_options: dict[Literal["include_usage"], StrictBool] | None = None
    max_tokens: StrictInt | None = Field(None, ge=1, le=32_768)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=32_768)
    temperature: StrictFloat | StrictInt | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | StrictInt | None = Field(None, gt=0, le=1)
    presence_penalty: StrictFloat | StrictInt | None = Field(None, ge=-2, le=2)
    frequency_penalty: StrictFloat | StrictInt | None = Field(None, ge=-2, le=2)
    seed: StrictInt | None = None
    stop: Annotated[str, StringConstraints(max_length=200)] | list[str] | None = Field(None)
    n: Literal[1] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    user: Annotated[str, StringConstraints(max_length=256)] | None = None


@dataclass(frozen=True)
class Persona:
    """Who the request talks to: the DID, its system text, its adapter (None: the base)."""

    persona_id: str
    system: str
    adapter: Servable | None


def openai_error(response: web.StreamResponse) -> web.StreamResponse:
    """An error answer of this daemon (`{"error": kind, "reason": text}`) in the OpenAI
    API's shape, `{"error": {"message", "type", "param", "code"}}`, which OpenAI clients
    read their exception's message from; anything else unchanged."""
    if not isinstance(response, web.Response) or response.status < 400 or not isinstance(response.body, bytes):
        return response
    try:
        body = json.loads(response.body)
    except ValueError:
        return response
    if not (isinstance(body, dict) and isinstance(body.get("error"), str)):
        return response
    error = {"message": body.get("reason", ""), "type": body["error"], "param": None, "code": response.status}
    headers = {k: v for k, v in response.headers.items() if k in ("Retry-After", "WWW-Authenticate", "Connection")}
    return web.json_response({"error": error}, status=response.status, headers=headers)


def system_turn(description: str, memories: list[tuple[str, str]], caller: list[str]) -> str:
    """The one system turn: the persona's description, its recalled (input, output)
    exchanges as "User:/You:" lines, most relevant first, then the caller's system texts."""
    parts = [_SPECIAL.sub("", description).strip()]
    if memories:
        lines = ["Things you remember from earlier conversations:"]
        for asked, answered in memories:
            asked, answered = (_SPECIAL.sub("", t)[:MEMORY_CHARS].strip() for t in (asked, answered))
            lines.append(f"- User: {asked}\n  You: {answered}")
        parts.append("\n".join(lines))
    return "\n\n".join([p for p in parts if p] + caller)


class PersonaChat:
    """The chat route. `produce` sends the recorded exchange; `denied` is the bearer check."""

    def __init__(
        self,
        settings: Settings,
        collections: Collections,
        produce: Callable[[Publish], Awaitable[None]],
    ) -> None:
        self.settings, self.collections, self.produce = settings, collections, produce
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
        except Exception as exc:
            return error_response(503, "chroma_unavailable", await self.collections.problem() or logs.describe(exc))
        metrics.CHAT_SECONDS.labels(stage="recall").observe(time.perf_counter() - started)
        caller = [m.text() for m in chat.messages if m.role in ("system", "developer")]
        turns = [{"role": "system", "content": persona.system + ("\n\n" + "\n\n".join(caller) if caller else "")}]
        turns += [{"role": m.role, "content": m.text()} for m in chat.messages if m.role in ("user", "assistant")]
        body = {**chat.model_dump(exclude_none=True, exclude={"messages"}), "messages": turns}
        problems = []
        for server in self.servers:
            try:
                return await self._forward(request, server, body, chat, persona, started)
            except ServerDown as exc:
                problems.append(str(exc))
        reason = f"no vLLM server answered (INGS_VLLM_URLS): {'; '.join(problems)}"
        logs.event("chat_no_server", logging.WARNING, reason=reason)
        return error_response(503, "server_unavailable", reason, **{"Retry-After": "5"})

    async def _persona(self, chat: ChatRequest) -> Persona:
        """The persona `chat.model` names, its system text with recalled memories and its
        current adapter. Raises LookupError for a model that names no persona here."""
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
            found = await self.collections.query(memory_of(persona_id), vector, self.settings.ings_chat_memories)
            memories = [(str(r.metadata.get("input", "")), str(r.metadata.get("output", ""))) for r in found]
        if persona is None and adapter is None and not memories:
            raise LookupError(f"no handshake, memory or adapter for {persona_id}")
        description = persona.description if persona else ""
        return Persona(persona_id, system_turn(description, memories, []), adapter)

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
        model = persona.adapter.name if persona.adapter else await self._base_name(server)
        timeout = aiohttp.ClientTimeout(total=self.settings.ings_chat_timeout_s)
        try:
            upstream = await server.session().post(
                f"{server.url}/v1/chat/completions", json={**body, "model": model}, timeout=timeout
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ServerDown(f"{server.url}: {type(exc).__name__}: {str(exc)[:300]}") from exc
        async with upstream:
            if upstream.status in (502, 503, 504):
                raise ServerDown(f"{server.url}: HTTP {upstream.status}")
            if upstream.status != 200:
                text = await upstream.text()
                return web.Response(text=text, status=upstream.status, content_type="application/json")
            if not chat.stream:
                answer = ChatCompletion.model_validate_json(await upstream.read())
                answer = answer.model_copy(update={"model": chat.model})
                metrics.CHAT_SECONDS.labels(stage="total").observe(time.perf_counter() - started)
                choice = answer.choices[0] if answer.choices else None
                if choice is not None:
                    await self._record(
                        chat, persona, model, answer.id, choice.message.content or "", choice.finish_reason
                    )
                return web.json_response(text=answer.model_dump_json(exclude_unset=True))
            return await self._stream(request, upstream, chat, persona, model, started)

    async def _stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        chat: ChatRequest,
        persona: Persona,
        model: str,
        started: float,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        text: list[str] = []
        completion_id = ""
        finish_reason: str | None = None
        try:
            async for chunk in _events(upstream):
                if chunk is None:
                    await response.write(b"data: [DONE]\n\n")
                    break
                if not text and not completion_id:
                    metrics.CHAT_SECONDS.labels(stage="first_token").observe(time.perf_counter() - started)
                completion_id = chunk.id
                for choice in chunk.choices:
                    text.append(choice.delta.content or "")
                    finish_reason = choice.finish_reason or finish_reason
                out = chunk.model_copy(update={"model": chat.model}).model_dump_json(exclude_unset=True)
                await response.write(f"data: {out}\n\n".encode())
        except (ConnectionResetError, aiohttp.ClientError) as exc:  # the client left, or vLLM did
            finish_reason = finish_reason or "disconnected"
            logs.event("chat_stream_ended", logging.WARNING, error=logs.describe(exc))
        metrics.CHAT_SECONDS.labels(stage="total").observe(time.perf_counter() - started)
        if completion_id:
            await self._record(chat, persona, model, completion_id, "".join(text), finish_reason)
        return response

    async def _record(
        self, chat: ChatRequest, persona: Persona, model: str, completion_id: str, answer: str, finish: str | None
    ) -> None:
        """Produce the exchange to `ings.interaction`; a failure is logged, never answered:
        the caller has the answer already."""
        asked = next((m.text() for m in reversed(chat.messages) if m.role == "user"), "")
        metadata: dict[str, Any] = {"source": "chat", "served_model": model, "finish_reason": finish}
        try:
            event = Interaction.model_validate(
                {
                    "persona_id": persona.persona_id,
                    "input": asked,
                    "output": answer,
                    "event_id": f"chat-{completion_id}"[:256],
                    "session_id": chat.user,
                    "metadata": metadata,
                }
            )
            topic = self.settings.topics.interaction
            await self.produce(Publish(topic, persona.persona_id, event.model_dump_json(exclude_none=True).encode()))
        except Exception as exc:  # an empty or oversized answer, the broker away
            logs.event("chat_not_recorded", logging.WARNING, persona_id=persona.persona_id, error=logs.describe(exc))


async def _events(upstream: aiohttp.ClientResponse) -> AsyncIterator[ChatCompletionChunk | None]:
    """The chunks of an OpenAI server-sent event stream; None for its `[DONE]`."""
    async for line in upstream.content:
        data = line.decode("utf-8", "replace").strip()
        if not data.startswith("data:"):
            continue
        data = data[len("data:") :].strip()
        if data == "[DONE]":
            yield None
            return
        yield ChatCompletionChunk.model_validate(json.loads(data))
