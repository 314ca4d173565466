"""Handshakes: validate or mint a persona's DID, store the persona, publish it.

A handshake without a `persona_id` gets a DID minted from its idempotency key, so the
same document replayed gets the same DID. Personas live in Chroma (a collection beside
the memory, with the name and description embedded) and on the compacted topic
`ings.persona`, keyed by DID.
"""

from __future__ import annotations

from ..config import Settings
from ..contract.events import Handshake, Persona
from ..contract.ids import mint_did, utcnow
from ..runtime import metrics
from ..runtime.decode import Incoming
from ..runtime.kafka import message_size
from ..runtime.router import Reject
from ..storage.chroma import Collections, Record
from ..storage.embedder import Embedder
from ..storage.personas import load_persona


def _record(persona: Persona, vector: list[float]) -> Record:
    return Record(
        id=persona.persona_id,
        document=f"{persona.name}\n{persona.description}",
        metadata={"persona_id": persona.persona_id, "name": persona.name, "json": persona.model_dump_json()},
        embedding=vector,
    )


def training_refusal(persona: Persona | None, settings: Settings) -> str | None:
    """Why nothing is trained for `persona` here, or None when it trains (an unregistered
    persona trains with the defaults). A model_type in INGS_ONLINE_MODEL_TYPES, or ending in
    "_api", names an online backend: an adapter would have nowhere to be served."""
    if persona is None:
        return None
    kind = persona.model_type
    # Compared as written by hand: "XAI-Grok" and "xai_grok" are one backend.
    normal = kind.strip().lower().replace("-", "_")
    online = {t.strip().lower().replace("-", "_") for t in settings.ings_online_model_types}
    if normal in online or normal.endswith("_api"):
        return (
            f"persona {persona.persona_id} has model_type {kind}, an online backend: its memory is kept"
            " but it is not trained (INGS_ONLINE_MODEL_TYPES)"
        )
    return None


class Personas:
    def __init__(self, collections: Collections, embedder: Embedder, max_message_bytes: int) -> None:
        self.collections = collections
        self.embedder = embedder
        self.max_message_bytes = max_message_bytes

    async def get(self, persona_id: str) -> Persona | None:
        return await load_persona(self.collections, persona_id)

    async def register(self, items: list[Incoming[Handshake]]) -> tuple[list[Persona], list[Reject]]:
        """Store each handshake's persona (a later handshake for a DID updates it); a persona
        that would not fit one Kafka message on `ings.persona` is rejected, not stored."""
        stored: list[Persona] = []
        rejected: list[Reject] = []
        vectors = await self.embedder.embed([f"{i.event.persona.name}\n{i.event.persona.description}" for i in items])
        for item, vector in zip(items, vectors, strict=True):
            info = item.event.persona
            did = info.persona_id or mint_did(info.name, item.event.version, item.event_id)
            existing = await self.get(did)
            now = utcnow()
            persona = Persona(
                persona_id=did,
                name=info.name,
                model_type=info.model_type,
                default_mode=info.default_mode,
                description=info.description,
                metadata=info.metadata,
                lora_config=info.lora_config,
                document_version=item.event.version,
                minted=info.persona_id is None,
                source_event_id=item.event_id,
                registered_at=existing.registered_at if existing else now,
                updated_at=now,
            )
            # Numbers re-serialise longer (1e15 -> 1000000000000000.0): measured as published.
            size = message_size(did.encode(), persona.model_dump_json().encode())
            if size > self.max_message_bytes:
                reason = (
                    f"the persona as published is {size} bytes; KAFKA_MAX_MESSAGE_BYTES is {self.max_message_bytes}"
                )
                rejected.append(Reject(item.record, "too_large", reason))
                continue
            await self.collections.upsert("personas", _record(persona, vector))
            metrics.PERSONAS_REGISTERED.inc()
            stored.append(persona)
        return stored, rejected
