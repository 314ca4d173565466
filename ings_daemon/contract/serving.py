"""Serving: the names adapters are served under, and the served-model event.

Every adapter version is served under a name of its own, derived from the persona's DID and
the version, never reused: vLLM can answer from stale prefix-cache entries when changed
weights are loaded again under one name (vllm-project/vllm#42125). The name is also the
folder name a LoRA resolver (`VLLM_LORA_RESOLVER_CACHE_DIR/<name>`) looks up.
"""

from __future__ import annotations

import re
from datetime import datetime

from pydantic import Field

from .events import Did, Strict
from .ids import DID_RE, utcnow

# vLLM's accepted `--max-lora-rank` values (vllm/config/lora.py, MaxLoRARanks); an adapter
# of a higher rank than the server's setting is refused when it is loaded.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# LoRA on these is refused by vLLM for causal LMs (only `modules_to_save` of classifier heads
# are accepted): the output head and the token embeddings, by their usual names.
UNSERVABLE_MODULES = frozenset({"lm_head", "embed_tokens", "wte", "wpe", "embed_out", "word_embeddings"})

PREFIX = "ings-"
# ings-<type>-<document version>-<id>-v<adapter version>, the DID's last three segments.
# The id and the document version hold no "-", so the name parses from the right uniquely.
_NAME_RE = re.compile(
    r"^ings-(?P<kind>[a-z][a-z0-9_-]{0,63})-(?P<doc>v[0-9]{1,6}(?:\.[0-9]{1,6}){0,3})"
    r"-(?P<ident>[a-z0-9]{6,64})-v(?P<version>[1-9][0-9]{0,8})$"
)


def served_name(persona_id: str, version: int) -> str:
    """The name version `version` of `persona_id` is served under, such as
    `ings-techlead-v2.0-a7f3b9d2c8e1-v3` (at most 150 characters, `[a-z0-9_.-]`).

    Raises ValueError for a string that is not a DID or a version outside 1..999,999,999."""
    if not DID_RE.fullmatch(persona_id) or not 0 < version < 10**9:
        raise ValueError(f"no served name for {persona_id[:200]!r} v{version}")
    kind, doc, ident = persona_id.split(":")[4:]
    return f"{PREFIX}{kind}-{doc}-{ident}-v{version}"


def parse_served_name(name: str) -> tuple[str, int] | None:
    """(persona_id, version) of a served name; None for any other model name."""
    match = _NAME_RE.fullmatch(name)
    if match is None:
        return None
    did = f"did:nings:artificial:llm:{match['kind']}:{match['doc']}:{match['ident']}"
    return (did, int(match["version"])) if DID_RE.fullmatch(did) else None


class ServedModel(Strict):
    """The model name a front end asks for to talk to a persona, on the compacted topic
    `ings.served-model` (keyed by persona id; the latest value is the current one).

    `served_name` is null while the persona has no servable adapter: chat then uses the
    base model. `refused` maps each server (or `resolver`) that refused the current version
    to its reason, in the server's words.
    """

    persona_id: Did
    served_name: str | None
    version: int | None
    base_model: str | None
    refused: dict[str, str] = Field(default_factory=dict)
    at: datetime = Field(default_factory=utcnow)
