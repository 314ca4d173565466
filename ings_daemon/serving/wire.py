"""The OpenAI chat API's wire format, as the persona chat reads and writes it: the accepted
request (`ChatRequest`), errors in OpenAI's shape, and the persona's system turn."""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StringConstraints

# Each memory is cut to this many characters in the system turn: a few memories must fit a
# small server's context (vLLM's --max-model-len) beside the conversation.
MEMORY_CHARS = 400
# Special-token spellings (<|im_end|>, <|eot_id|>, <s>, </s>): text that holds one would be
# tokenised as the token by the server and could end a turn early and forge another.
_SPECIAL = re.compile(r"<\|[^|<>\s]{1,40}\|>|</?s>")
# OpenAI's error `type` by status (its API reference, "Error codes"); `code` carries ours.
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def plain_text(text: str) -> str:
    """`text` without special-token spellings: what a chat turn, memory or description may
    put in the rendered prompt."""
    return _SPECIAL.sub("", text)


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
        """The content as one string, without special-token spellings (`plain_text`)."""
        return plain_text(self.content if isinstance(self.content, str) else "".join(p.text for p in self.content))


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
    status = response.status
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    error = {"message": body.get("reason", ""), "type": kind, "param": None, "code": body["error"]}
    headers = {k: v for k, v in response.headers.items() if k in ("Retry-After", "WWW-Authenticate", "Connection")}
    return web.json_response({"error": error}, status=response.status, headers=headers)


def system_turn(description: str, memories: list[tuple[str, str]], caller: list[str]) -> str:
    """The one system turn: the persona's description, its recalled (input, output)
    exchanges as "User:/You:" lines, most relevant first, then the caller's system texts."""
    parts = [plain_text(description).strip()]
    if memories:
        lines = ["Things you remember from earlier conversations:"]
        for asked, answered in memories:
            asked, answered = (plain_text(t)[:MEMORY_CHARS].strip() for t in (asked, answered))
            lines.append(f"- User: {asked}\n  You: {answered}")
        parts.append("\n".join(lines))
    return "\n\n".join([p for p in parts if p] + caller)
