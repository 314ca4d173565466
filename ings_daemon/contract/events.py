"""The event models: the public contract on every topic.

Input models accept the INGS guide's documents unchanged (unknown top-level keys of a
persona document are kept, not rejected). Output models are what this daemon publishes.
`schemas/` is generated from this module by `ings-daemon schemas`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    field_validator,
)

from .ids import DID_PATTERN, utcnow

Did = Annotated[str, StringConstraints(pattern=DID_PATTERN)]
Text = Annotated[str, StringConstraints(min_length=1, max_length=16_000)]
ShortText = Annotated[str, StringConstraints(max_length=256)]
MetaValue = str | int | float | bool
TuneState = Literal["accepted", "rejected", "started", "progress", "succeeded", "failed"]
# The quality gate's decision on a run: its held-out loss beat the base's and the previous
# version's (passed) or not (failed); too few examples to hold any out (not_gated); or
# INGS_QUALITY_GATE=false (off).
GateDecision = Literal["passed", "failed", "not_gated", "off"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


# --- inputs -------------------------------------------------------------------------------


class LoraSpec(Strict):
    """The guide's `lora_config`, with the optional knobs a run accepts. Numbers and flags
    are strict: `"3"` or `true` where a number belongs is an error, not a conversion."""

    model_name: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    rank: StrictInt = Field(8, ge=1, le=256)
    alpha: StrictFloat = Field(16, gt=0, le=4096)
    dropout: StrictFloat = Field(0.05, ge=0, lt=1)
    target_modules: list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.]{1,64}$")]] | None = None
    epochs: StrictInt = Field(3, ge=1, le=100)
    learning_rate: StrictFloat = Field(2e-4, gt=0, le=1)
    max_seq_len: StrictInt = Field(512, ge=16, le=8192)
    # QLoRA: the base loaded in 4 bits (NF4, double quantisation, bfloat16 compute) or 8 bits
    # with bitsandbytes; CUDA only.
    quantization: Literal["4bit", "8bit"] | None = None


class PersonaInfo(Strict):
    persona_id: Did | None = None
    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    model_type: ShortText = "llm"
    default_mode: ShortText = "default"
    description: Annotated[str, StringConstraints(max_length=8_000)] = ""
    metadata: dict[str, Any] = Field(default_factory=dict)
    # The persona's own LoRA defaults (rank, alpha, base model...) for its auto jobs.
    lora_config: LoraSpec | None = None


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
    # Each key becomes a Chroma metadata field: a bounded number of short keys, because
    # thousands of them in one record break Chroma's metadata segment for every record.
    metadata: dict[Annotated[str, StringConstraints(min_length=1, max_length=64)], MetaValue] = Field(
        default_factory=dict, max_length=64
    )

    @field_validator("occurred_at", mode="before")
    @classmethod
    def _iso_text(cls, value: object) -> object:
        # ISO 8601 text only: a bare number would be read as Unix seconds, silently.
        if value is not None and not isinstance(value, str | datetime):
            raise ValueError("occurred_at must be an ISO 8601 date-time string")
        return value

    @field_validator("occurred_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Example(Strict):
    input: Text
    output: Text


class TuneRequest(Strict):
    persona_id: Did
    training_data: list[Example] = Field(default_factory=list, max_length=10_000)
    lora_config: LoraSpec = Field(default_factory=LoraSpec)
    include_memory: StrictBool = False
    event_id: ShortText | None = None
    request_id: ShortText | None = None


class RecallRequest(Strict):
    persona_id: Did
    query: Text
    k: StrictInt = Field(5, ge=1, le=100)
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
    lora_config: LoraSpec | None = None
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
    """One (input, output) pair of a run; `id` is its record id in Chroma."""

    id: str
    input: str
    output: str


class ExampleSet(Strict):
    """A claim check for a train job's examples: they stay in Chroma (interactions in the
    memory collection, tune-request examples in the examples collection) and the job carries
    their ids, in order, with the sha256 of their content (`contract.examples.examples_sha256`),
    so the job stays small and a replay trains on exactly the same data or not at all."""

    collection: Literal["memory", "examples"]
    ids: list[Annotated[str, StringConstraints(min_length=1, max_length=64)]] = Field(max_length=20_000)
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]

    @field_validator("ids")
    @classmethod
    def _unique(cls, ids: list[str]) -> list[str]:
        if len(set(ids)) != len(ids):
            raise ValueError("example ids must be unique")
        return ids


class TrainJob(Strict):
    """One LoRA run. `job_id` is derived from the persona and its examples, so a replayed
    trigger names the same job and the trainer does not run it twice."""

    job_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]
    persona_id: Did
    trigger: ShortText  # "auto" or the tune request's id
    base_model: str
    lora: LoraSpec
    examples: ExampleSet
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
    gate: GateDecision | None = None
    eval_loss: float | None = None
    base_eval_loss: float | None = None
    previous_eval_loss: float | None = None
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
    gate: GateDecision = "not_gated"
    # The version previous_eval_loss was measured on: the newest on the same base model
    # whose training examples the held-out split avoids (None: no fair comparison).
    compared_version: int | None = None


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
    # How prompts must be rendered to serve it: "chat_template" (the base tokenizer's own,
    # identified by its sha256) or "plain" (BOS + "### Input:\n...\n### Response:\n").
    prompt_format: Literal["plain", "chat_template"] = "plain"
    chat_template_sha256: str | None = None
    created_at: datetime


class DeadLetter(Strict):
    """A record that could not be processed, with where it came from and why.

    `value_b64` holds the original value when the letter fits KAFKA_MAX_MESSAGE_BYTES,
    otherwise its first bytes (`value_truncated` true); `value_size` and `value_sha256`
    always describe the whole original. A batch that could not be fetched at all is
    dead-lettered by its coordinates alone (`value_b64` null, error_type `fetch_error`).
    """

    # The record's key and the reason are kept as they were, whitespace included.
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    topic: str
    partition: int
    offset: int
    key: str | None
    value_b64: str | None
    value_truncated: bool = False
    value_size: int
    value_sha256: str | None
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
