"""Ids: the DID grammar, stable digests, and the idempotency key of an event without one."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Any

# did:nings:artificial:llm:<type>:<version>:<id>, e.g.
# did:nings:artificial:llm:techlead:v2.0:a7f3b9d2c8e1. Every segment is restricted to
# characters that are safe in a file name, and no segment can be "." or "..", so a
# validated DID can name a folder in the adapter store.
DID_PATTERN = (
    r"^did:nings:artificial:llm:[a-z][a-z0-9_-]{0,63}:"
    r"v[0-9]{1,6}(\.[0-9]{1,6}){0,3}:[a-z0-9]{6,64}$"
)
DID_RE = re.compile(DID_PATTERN)
_SLUG = re.compile(r"[^a-z0-9_-]+")
_VERSION = re.compile(r"^v?([0-9]{1,6}(\.[0-9]{1,6}){0,3})$")


def utcnow() -> datetime:
    return datetime.now(UTC)


def digest(*parts: str | bytes, length: int = 32) -> str:
    """A stable hex id from its parts (idempotency keys, record ids, job ids).

    Strings are encoded as UTF-8; a string that cannot be (a lone surrogate) raises
    UnicodeEncodeError, which is why decoding rejects such text before any id is derived.
    """
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\x00")
    return h.hexdigest()[:length]


def derived_event_id(topic_kind: str, payload: dict[str, Any]) -> str:
    """The id of an event that carries none: the same content always gives the same id."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "derived-" + digest(topic_kind, canonical)


def mint_did(name: str, document_version: str | None, event_id: str) -> str:
    """did:nings:artificial:llm:<type>:<version>:<id>, deterministic in its inputs."""
    kind = _SLUG.sub("-", name.lower()).strip("-_")[:64] or "persona"
    if not kind[0].isalpha():
        kind = ("p" + kind)[:64]
    match = _VERSION.match(document_version or "")
    version = f"v{match.group(1)}" if match else "v1.0"
    did = f"did:nings:artificial:llm:{kind}:{version}:{digest('did', event_id, length=12)}"
    assert DID_RE.fullmatch(did), did
    return did


def interaction_id(persona_id: str, event_id: str) -> str:
    """The memory record id of an interaction: the same event stored twice is one record."""
    return digest("interaction", persona_id, event_id)


def chat_event_id(completion_id: str) -> str:
    """The event id of a persona chat's recorded exchange (`serving.chat`), by which feedback
    names it: `chat-<completion id>`, cut to an event id's 256 characters."""
    return f"chat-{completion_id}"[:256]


def answer_ids(payload: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(persona_id, request_id) of a rejected request's JSON for its `rejected` answer, each
    None unless it is a valid DID, or a request id (else event id) of 1-256 characters."""
    payload = payload or {}
    pid, rid = payload.get("persona_id"), payload.get("request_id") or payload.get("event_id")
    return (
        pid if isinstance(pid, str) and DID_RE.fullmatch(pid) else None,
        rid if isinstance(rid, str) and len(rid.strip()) > 0 and len(rid) <= 256 else None,
    )
