"""The persona registry as both roles read it: a registered persona by DID."""

from __future__ import annotations

from ..contract.events import Persona
from .chroma import Collections


async def load_persona(collections: Collections, persona_id: str) -> Persona | None:
    """The registered persona `persona_id`, or None when no handshake registered it."""
    found = await collections.get("personas", ids=[persona_id])
    return Persona.model_validate_json(str(found[0].metadata["json"])) if found else None
