"""The event models: the public contract on every topic.

Input models accept the INGS guide's documents unchanged (unknown top-level keys of a
persona document are kept, not rejected). Output models are what this daemon publishes.
`schemas/` is generated from this module by `ings-daemon schemas`.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

# did:nings:artificial:llm:<type>:<version>:<id>, e.g.
# did:nings:artificial:llm:techlead:v2.0:a7f3b9d2c8e1. Every segment is restricted to
# characters that are safe in a file name, and no segment can be "." or "..", so a
# validated DID can name a folder in the adapter store.
DID_PATTERN = (
    r"^did:nings:artificial:llm:[a-z][a-z0-9_-]{0,63}:"
    r"v[0-9]{1,6}(\.[0-9]{1,6}){0,3}:[a-z0-9]{6,64}$"
)
DID_RE = re.compile(DID_PATTERN)

Did = Annotated[str, StringConstraints(pattern=DID_PATTERN)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=16_000)]
ShortText = Annotated[str, StringConstraints(max_length=256)]
MetaValue = str | int | float | bool
TuneState = Literal["accepted", "rejected", "started", "progress", "succeeded", "failed"]


def utcnow() -> datetime:
    return datetime.now(UTC)


def digest(*parts: str | bytes, length: int = 32) -> str:
    """A stable hex id from its parts (idempotency keys, record ids, job ids)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\x00")
    return h.hexdigest()[:length]


def derived_event_id(topic_kind: str, payload: dict[str, Any]) -> str:
    """The id of an event that carries none: the same content always gives the same id."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "derived-" + digest(topic_kind, canonical)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


# --- inputs -------------------------------------------------------------------------------


class PersonaInfo(Strict):
    persona_id: Did | None = None
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    model_type: ShortText = "llm"
    default_mode: ShortText = "default"
    description: Annotated[str, StringConstraints(max_length=8_000)] = ""
    metadata: dict[str, Any] = Field(default_factory=dict)


class Handshake(BaseModel):
    """A persona document as the INGS guide writes it: `{"version", ..., "persona": {...}}`."""

    model_config = ConfigDict(extra="allow", str_strip_whitespace=True)

    event_id: ShortText | None = None
    version: ShortText | None = None
    persona: PersonaInfo


class Interaction(Strict):
    persona_id: Did
    input: Text
    output: Text
    event_id: ShortText | None = None
    session_id: ShortText | None = None
    mode: ShortText | None = None
    occurred_at: datetime | None = None
    metadata: dict[str, MetaValue] = Field(default_factory=dict)

    @field_validator("occurred_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Example(Strict):
    input: Text
    output: Text


class LoraSpec(Strict):
    """The guide's `lora_config`, with the optional knobs a run accepts."""

    model_name: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    rank: int = Field(8, ge=1, le=256)
    alpha: float = Field(16, gt=0, le=4096)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.]{1,64}$")]] | None = None
    epochs: int = Field(3, ge=1, le=100)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    max_seq_len: int = Field(512, ge=16, le=8192)


class TuneRequest(Strict):
    persona_id: Did
    training_data: list[Example] = Field(default_factory=list, max_length=10_000)
    lora_config: LoraSpec = Field(default_factory=LoraSpec)
    include_memory: bool = False
    event_id: ShortText | None = None
    request_id: ShortText | None = None


class RecallRequest(Strict):
    persona_id: Did
    query: Text
    k: int = Field(5, ge=1, le=100)
    request_id: ShortText
    event_id: ShortText | None = None


# --- outputs ------------------------------------------------------------------------------


class Persona(Strict):
    """A registered persona as published on the compacted `ings.persona` topic."""

    persona_id: Did
    name: str
    model_type: str
    default_mode: str
    description: str
    metadata: dict[str, Any]
    document_version: str | None
    minted: bool
    source_event_id: str
    registered_at: datetime
    updated_at: datetime


class Memory(Strict):
    id: str
    persona_id: Did
    input: str
    output: str
    score: float
    session_id: str | None = None
    mode: str | None = None
    occurred_at: datetime | None = None


class RecallResult(Strict):
    request_id: str
    persona_id: Did
    query: str
    results: list[Memory]


class TrainExample(Strict):
    id: str
    input: str
    output: str


class TrainJob(Strict):
    """One LoRA run. `job_id` is derived from the persona and its examples, so a replayed
    trigger names the same job and the trainer does not run it twice."""

    job_id: str
    persona_id: Did
    trigger: str  # "auto" or the tune request's id
    base_model: str
    lora: LoraSpec
    examples: list[TrainExample]
    created_at: datetime


class TuneStatus(Strict):
    persona_id: Did | None
    status: TuneState
    job_id: str | None = None
    request_id: str | None = None
    reason: str | None = None
    advice: str | None = None
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    version: int | None = None
    at: datetime = Field(default_factory=utcnow)


class AdapterMetrics(Strict):
    train_loss_first: float
    train_loss_last: float
    eval_loss: float | None
    base_eval_loss: float | None
    previous_eval_loss: float | None
    examples: int
    eval_examples: int
    tokens: int
    steps: int
    duration_s: float


class AdapterReady(Strict):
    persona_id: Did
    version: int
    adapter_path: str
    adapter_uri: str
    base_model: str
    lora: LoraSpec
    metrics: AdapterMetrics
    trigger: str
    job_id: str
    checksums: dict[str, str]
    created_at: datetime


class DeadLetter(Strict):
    topic: str
    partition: int
    offset: int
    key: str | None
    value_b64: str
    value_text: str | None
    reason: str
    error_type: str
    at: datetime = Field(default_factory=utcnow)


# Every model with a published schema, by file name stem.
SCHEMAS: dict[str, type[BaseModel]] = {
    "handshake": Handshake,
    "interaction": Interaction,
    "tune-request": TuneRequest,
    "recall-request": RecallRequest,
    "persona": Persona,
    "recall-result": RecallResult,
    "train-job": TrainJob,
    "tune-status": TuneStatus,
    "adapter-ready": AdapterReady,
    "dlq": DeadLetter,
}
